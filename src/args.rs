// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command-line arguments (clap derive only; validation is in `config`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// vhost-user virtio-blk backend for raw images and User-Mode-Linux COW files.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-ubd", version, about, long_about = None)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a UML COW file over a backing image (same bytes as `uml_mkcow COW BACKING`).
    Create {
        /// Alignment of the bitmap and data areas (uml_mkcow uses 4096).
        #[arg(long, default_value_t = 4096)]
        alignment: u32,
        /// The COW file to create (must not exist).
        cow: PathBuf,
        /// The read-only backing image.
        backing: PathBuf,
    },
    /// Show a COW file's header, layout, used sectors and backing status.
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The COW file.
        cow: PathBuf,
    },
    /// Check that a COW file can be served: header, layout, backing, locks.
    /// Exit status 0 only when it is usable.
    Check {
        /// Use this backing file instead of the header's.
        #[arg(long)]
        backing: Option<PathBuf>,
        /// The COW file.
        cow: PathBuf,
    },
}
