//! `bench`: parse the command line, run the command, print any error once as a chain,
//! and exit with 0 (success), 1 (error) or 2 (regression).

use clap::Parser;
use quantbench::cli::{self, Cli};

fn main() {
    // Every command runs on the compute pool: see `quantbench::tensor::on_pool`.
    let code = match quantbench::tensor::on_pool(|| cli::execute(Cli::parse())) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("{}", error.chain());
            cli::EXIT_ERROR
        }
    };
    std::process::exit(code);
}
