//! The `holdfast` binary: parse the command line, set up logging, run, map errors to exit codes.

mod cli;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    telemetry::init(args.verbose, args.quiet);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("holdfast: cannot start the async runtime: {e}");
            return ExitCode::from(70);
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A closed pipe (`holdfast snapshot list | head`) is not a failure.
            if err.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("holdfast: error: {err:#}");
            let code = err
                .chain()
                .find_map(|c| c.downcast_ref::<holdfast::Error>())
                .map(holdfast::Error::exit_code)
                .unwrap_or(1);
            ExitCode::from(code as u8)
        }
    }
}
