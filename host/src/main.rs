//! The `holdfast` binary. Everything it does is in the library ([`holdfast::cli`]), so that the
//! end-to-end tests can build the same program against a mutated library (`tests/mutants.sh`).

fn main() -> std::process::ExitCode {
    holdfast::cli::main()
}
