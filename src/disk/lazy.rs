// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A disk queue made on first use.
//!
//! The daemon offers up to 16 virtqueues by default, because frontends pick
//! their queue count on their own (QEMU: the vCPU count), and a backend
//! that offers fewer makes QEMU give up. A queue's io_uring costs about
//! 128 KiB and its worker bookkeeping a few fds; 16 made eagerly took a
//! daemon from 3.8 to 5.8 MiB of RSS and 14 to 44 fds. So each queue gets
//! only its eventfd (registered with the worker's epoll at start) until its
//! first request, which creates the real queue on that eventfd.

use std::{
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
    time::Duration,
};

use super::{Completion, Disk, DiskQueue, Request, Submitted};
use crate::engine::EventFd;

/// A [`DiskQueue`] whose real queue is made by the first `submit`.
pub struct LazyQueue {
    disk: Arc<dyn Disk>,
    event: Arc<EventFd>,
    inner: Option<Box<dyn DiskQueue>>,
    /// Requests answered without a queue (it could not be made).
    failed: Vec<Completion>,
    told: bool,
}

impl std::fmt::Debug for LazyQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyQueue")
            .field("made", &self.inner.is_some())
            .finish_non_exhaustive()
    }
}

impl LazyQueue {
    /// A queue of `disk` that will signal a new eventfd.
    pub fn new(disk: Arc<dyn Disk>) -> std::io::Result<Self> {
        Ok(Self {
            disk,
            event: Arc::new(EventFd::new()?),
            inner: None,
            failed: Vec::new(),
            told: false,
        })
    }

    /// Whether the real queue exists yet.
    pub fn is_made(&self) -> bool {
        self.inner.is_some()
    }

    fn inner(&mut self) -> Option<&mut Box<dyn DiskQueue>> {
        if self.inner.is_none() {
            match self.disk.new_queue_on(self.event.clone()) {
                Ok(q) => self.inner = Some(q),
                Err(e) => {
                    if !self.told {
                        log::error!("cannot make a disk queue: {e}; its requests fail");
                        self.told = true;
                    }
                    return None;
                }
            }
        }
        self.inner.as_mut()
    }
}

impl DiskQueue for LazyQueue {
    fn submit(&mut self, req: Request) -> Submitted {
        match self.inner() {
            Some(q) => q.submit(req),
            None => {
                self.failed.push(Completion {
                    tag: req.tag,
                    result: Err(libc::EIO),
                });
                self.event.signal();
                Submitted::Queued
            }
        }
    }

    fn commit(&mut self) -> std::io::Result<()> {
        self.inner.as_mut().map_or(Ok(()), |q| q.commit())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> bool {
        out.append(&mut self.failed);
        match &mut self.inner {
            Some(q) => q.poll(out),
            None => {
                self.event.drain();
                false
            }
        }
    }

    fn wake(&self) {
        self.event.signal();
    }

    fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    fn wait(&self, timeout: Option<Duration>) {
        match &self.inner {
            Some(q) => q.wait(timeout),
            None => {
                self.event.wait_for(timeout);
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.inner
            .as_ref()
            .map_or(0, |q| q.in_flight())
            .saturating_add(self.failed.len())
    }
}
