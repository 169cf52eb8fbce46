//! The `kiln` binary: the daemon (`kiln serve`) and the CLI client
//! (`kiln kmod build`, `kiln provision`, `kiln status`, `kiln logs`) and
//! `kiln dkms2bin`. Parses configuration
//! once, wires the crates together, and owns the process: signals, the data
//! directory lock, logging.

mod client;
mod config;
mod dkms2bin;
mod provision;
mod serve;

use anyhow::Result;
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = config::Cli::parse();
    let r: Result<()> = match cli.command {
        config::Command::Serve(args) => serve::run(args).await,
        config::Command::Kmod(config::KmodCmd::Build(args)) => client::kmod_build(args).await,
        config::Command::Status(args) => client::status(args).await,
        config::Command::Logs(args) => client::logs(args).await,
        config::Command::Dkms2bin(args) => dkms2bin::run(args).await,
        config::Command::Provision(args) => provision::run(args).await,
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
