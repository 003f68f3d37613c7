//! `bench`: parse the command line, run the command, print any error once as a chain,
//! and exit with 0 (success), 1 (error), 2 (regression) or 64 (usage error).

use clap::Parser;
use quantbench::cli::{self, Cli};

fn main() {
    // First, before any thread starts: see `quantbench::interrupt`.
    quantbench::interrupt::install();
    quantbench::measure::memory::keep_freed_buffers();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(usage) => {
            // Help and version go to stdout with 0; a malformed command line is a usage
            // error, never clap's default 2, which means "regression" here.
            let _ = usage.print();
            std::process::exit(if usage.use_stderr() { cli::EXIT_USAGE } else { cli::EXIT_OK });
        }
    };
    // Every command runs on the compute pool: see `quantbench::tensor::on_pool`.
    let code = match quantbench::tensor::on_pool(|| cli::execute(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("{}", error.chain());
            cli::EXIT_ERROR
        }
    };
    std::process::exit(code);
}
