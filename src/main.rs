//! The `catraca` binary: parse the command line, run it, exit with its code.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;

/// mimalloc: the request path allocates many small short-lived objects on two worker threads, where
/// glibc's malloc spent a fifth of the CPU under load (measured with `perf`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = catraca::cli::Cli::parse();
    match catraca::cli::run(cli).await {
        Ok(code) => code,
        // A reader that stopped reading (`catraca audit export ... | head`) is not an error.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            // A closed stderr must not turn an error into a panic.
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
