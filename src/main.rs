// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-ubd`: parse arguments, run the subcommand, map errors to an
//! exit status. Everything else lives in the library.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

mod args;
mod cli;
mod job_cli;

fn main() -> ExitCode {
    let matches = args::Args::command().get_matches();
    let mut args = match args::Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    // The backend program conventions: print and exit before anything else.
    if args.print_capabilities {
        println!("{}", cli::capabilities());
        return ExitCode::SUCCESS;
    }
    // Which `serve` arguments were given (a takeover checks those only).
    let serve_matches = match &args.command {
        Some(args::Command::Serve(_)) => matches.subcommand_matches("serve"),
        None => Some(&matches),
        Some(_) => None,
    };
    if let Some(m) = serve_matches {
        let explicit: Vec<String> = m
            .ids()
            .filter(|id| {
                m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
            })
            .map(|id| id.as_str().to_owned())
            .collect();
        if args.command.is_none() && explicit.is_empty() {
            let _ = args::Args::command().print_help();
            return ExitCode::from(2);
        }
        match &mut args.command {
            Some(args::Command::Serve(serve)) => serve.explicit = explicit,
            _ => args.serve.explicit = explicit,
        }
    }
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
