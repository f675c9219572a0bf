//! The holdfast program, built by this package when its `mutants` feature is on, so that
//! `cargo test --features mutants` rebuilds what the end-to-end tests run (tests/mutants.sh).

fn main() -> std::process::ExitCode {
    holdfast::cli::main()
}
