//! The `holdfast` binary: parse the command line, set up logging, run, map errors to exit codes.

mod cli;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

/// Cuts every run of more than 80 non-blank characters to its first 64.
fn shorten_words(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(4096));
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        if word.chars().count() > 80 {
            out.extend(word.chars().take(64));
            out.push_str(&format!("…({} chars)", word.chars().count()));
        } else {
            out.push_str(word);
        }
    }
    out
}

/// Everything holdfast creates is private to its user, whatever the umask it inherited: a
/// backup repository, its catalog, tokens and restored images are not for other local users.
#[allow(unsafe_code)]
fn private_umask() {
    // SAFETY: umask only sets the process's file-creation mask; it cannot fail, touches no
    // memory, and runs before any other thread exists.
    unsafe {
        libc::umask(0o077);
    }
}

/// Few malloc arenas. glibc gives each thread that allocates under contention an arena of its
/// own (up to 8 per core), and the daemon runs many (async workers, the blocking pool, rayon):
/// memory freed in one arena is not reused by the others, so a daemon's resident memory crept
/// up for hours (the soak: 53 → 167 MB in 7 minutes with the default, 51 → 81 MB with two
/// arenas, the same work done).
#[allow(unsafe_code)]
fn few_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it runs before any other thread
    // exists, and a value it refuses leaves the default.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    private_umask();
    few_malloc_arenas();
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // clap repeats the offending value; a hostile one can be megabytes long.
            eprint!("{}", shorten_words(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    telemetry::init(args.verbose, args.quiet);
    if let Some(fake) = std::env::var_os("HOLDFAST_FAKE_NOW") {
        // Tests replay a timeline with it (`policy simulate` must agree with what really
        // happens). A daemon's clock must move: leases, gc and schedules would stand still.
        if matches!(args.command, cli::Command::Daemon(_)) {
            eprintln!(
                "holdfast: error: HOLDFAST_FAKE_NOW is set; it is for tests of single commands, \
                 never for the daemon: unset it"
            );
            return ExitCode::from(2);
        }
        match fake.to_str().and_then(|s| s.parse::<u64>().ok()) {
            Some(ms) if ms > 0 => {
                holdfast::set_fake_now(ms);
                tracing::warn!(
                    "HOLDFAST_FAKE_NOW is set: this command takes the time to be {ms} ms since the epoch"
                );
            }
            _ => {
                eprintln!(
                    "holdfast: error: HOLDFAST_FAKE_NOW must be milliseconds since the Unix epoch"
                );
                return ExitCode::from(2);
            }
        }
    }
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
    let result = runtime.block_on(cli::run(args));
    // Blocking work left behind (a stopped daemon's job that waited for a file lock held by
    // another command) must not keep the process alive once the command is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A closed stdout (`holdfast snapshot list | head`) is not a failure.
            if err.chain().any(|c| c.is::<cli::StdoutClosed>()) {
                return ExitCode::SUCCESS;
            }
            // A message may quote text from outside (a peer's, an object store's): no
            // terminal escape in it reaches the terminal raw. Line breaks are ours.
            let text: String = format!("{err:#}")
                .split('\n')
                .map(|line| holdfast::id::escape_hazards(line).into_owned())
                .collect::<Vec<_>>()
                .join("\n");
            eprintln!("holdfast: error: {text}");
            let code = err
                .chain()
                .find_map(|c| c.downcast_ref::<holdfast::Error>())
                .map(holdfast::Error::exit_code)
                .unwrap_or(1);
            ExitCode::from(code as u8)
        }
    }
}
