// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-ubd`: parse arguments, run the subcommand, map errors to an
//! exit status. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;

mod args;
mod cli;

fn main() -> ExitCode {
    let args = args::Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vhost-user-ubd: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}
