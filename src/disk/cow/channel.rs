// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! How the queues of a COW disk and its durability thread talk: commands
//! to the thread (flush, persist, kick, shutdown) and one mailbox per queue
//! for its completions and the R4 "retry parked reads" wake-up.

use std::{
    ops::Range,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex, Weak,
    },
};

use crate::{disk::Completion, engine::EventFd};

/// Where the durability thread delivers a queue's completions.
#[derive(Debug)]
pub struct Mailbox {
    done: Mutex<Vec<Completion>>,
    retry: AtomicBool,
    wants_retry: AtomicBool,
    event: Arc<EventFd>,
}

impl Mailbox {
    /// A mailbox that signals `event` (the queue's eventfd).
    pub fn new(event: Arc<EventFd>) -> Self {
        Self {
            done: Mutex::new(Vec::new()),
            retry: AtomicBool::new(false),
            wants_retry: AtomicBool::new(false),
            event,
        }
    }

    /// Delivers a completion and signals the queue.
    pub fn deliver(&self, c: Completion) {
        if let Ok(mut d) = self.done.lock() {
            d.push(c);
        }
        self.event.signal();
    }

    /// Moves delivered completions to `out`; returns their number.
    pub fn take(&self, out: &mut Vec<Completion>) -> usize {
        self.done.lock().map_or(0, |mut d| {
            let n = d.len();
            out.append(&mut d);
            n
        })
    }

    /// The queue parked a read (R4): wake it when a bitmap write completes.
    pub fn park(&self) {
        self.wants_retry.store(true, Ordering::Release);
    }

    /// True once after a bitmap write completed while reads were parked.
    pub fn take_retry(&self) -> bool {
        self.retry.swap(false, Ordering::AcqRel)
    }

    /// Wakes the queue if it parked reads (R4).
    pub fn wake_if_parked(&self) {
        if self.wants_retry.swap(false, Ordering::AcqRel) {
            self.retry.store(true, Ordering::Release);
            self.event.signal();
        }
    }
}

/// Who to answer.
#[derive(Debug)]
pub struct Reply {
    /// The queue's mailbox.
    pub mailbox: Arc<Mailbox>,
    /// The request's tag.
    pub tag: u64,
}

/// Work for the durability thread.
#[derive(Debug)]
pub enum Cmd {
    /// A guest FLUSH.
    Flush(Reply),
    /// A writethrough write whose data completed: make it durable with the
    /// bits of these sector ranges.
    Persist(Vec<Range<u64>>, Reply),
    /// Something changed (a checkpoint may be due).
    Kick,
    /// Persist everything and stop.
    Shutdown(mpsc::Sender<Result<(), i32>>),
}

/// The command channel to the durability thread.
#[derive(Debug)]
pub struct Channel {
    cmds: Mutex<Vec<Cmd>>,
    event: Arc<EventFd>,
    mailboxes: Mutex<Vec<Weak<Mailbox>>>,
}

impl Channel {
    /// A channel whose thread waits on `event`.
    pub fn new(event: Arc<EventFd>) -> Self {
        Self {
            cmds: Mutex::new(Vec::new()),
            event,
            mailboxes: Mutex::new(Vec::new()),
        }
    }

    /// Sends a command.
    pub fn send(&self, cmd: Cmd) {
        if let Ok(mut c) = self.cmds.lock() {
            c.push(cmd);
        }
        self.event.signal();
    }

    /// Registers a queue's mailbox for R4 wake-ups.
    pub fn register(&self, mailbox: &Arc<Mailbox>) {
        if let Ok(mut m) = self.mailboxes.lock() {
            m.retain(|w| w.strong_count() > 0);
            m.push(Arc::downgrade(mailbox));
        }
    }

    /// A bitmap write completed: wakes the queues that parked reads (R4).
    pub fn wake_parked(&self) {
        if let Ok(m) = self.mailboxes.lock() {
            for mb in m.iter().filter_map(Weak::upgrade) {
                mb.wake_if_parked();
            }
        }
    }

    /// Takes every command sent so far.
    pub fn take(&self) -> Vec<Cmd> {
        self.cmds
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
    }
}

impl Channel {
    /// The eventfd the durability thread waits on.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}
