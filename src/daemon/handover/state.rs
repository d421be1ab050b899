// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The handover as the running instance (the source) sees it: a pure state
//! machine, driven by the steps its destination sends and by the
//! destination going away, that says what to do and what to undo. It owns
//! the rule "at most two instances reference one disk": a second
//! destination is refused while one is registered, and a retired source
//! refuses everything.
//!
//! ```text
//!  Idle --register--> Registered --suspend--> Suspended --(fds sent)--> Passed
//!   ^                     |                       |                       |
//!   |<------abort---------+<--------abort---------+<--------abort---------+
//!   |                                                                     | commit
//!   |<-----------------------------abort (undo the release)--------- Released
//!                                                                         | live
//!                                                                      Retired (exit)
//! ```

use serde::Serialize;

/// Where the source is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceState {
    /// Serving; no destination.
    Idle,
    /// A destination registered; still serving.
    Registered,
    /// Not popping; requests popped before have completed; persisting and
    /// passing the files.
    Suspended,
    /// The files are passed; waiting for the destination to commit.
    Passed,
    /// Frontend connection closed, not accepting, disk retired; waiting
    /// for the destination to say it serves.
    Released,
    /// The destination serves: this instance only answers errors, and exits.
    Retired,
}

impl SourceState {
    /// The name used in status replies and messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Registered => "registered",
            Self::Suspended => "suspended",
            Self::Passed => "passed",
            Self::Released => "released",
            Self::Retired => "retired",
        }
    }
}

/// A step the destination asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Become this instance's destination.
    Register {
        /// The destination's process id.
        pid: u32,
    },
    /// Suspend and pass the files.
    Suspend,
    /// The destination has built its disk: let go of the frontend.
    Commit,
    /// The destination serves.
    Live,
    /// Give up (also: the destination's connection ended).
    Abort,
}

/// What the source must do for a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Answer the registration (with what this instance serves).
    Register,
    /// Stop popping, wait for the requests in flight, persist, pass the
    /// files; then call [`Source::passed`] (or [`Source::on`] with
    /// [`Step::Abort`] if any of it failed).
    SuspendAndPass,
    /// Stop accepting, retire the disk, close the frontend connection.
    Release,
    /// Exit: the destination serves.
    Retire,
    /// Undo the handover so far and serve again: resume the device, and
    /// when `released`, also take the disk back and accept again.
    Resume {
        /// The release was done and must be undone too.
        released: bool,
    },
    /// Nothing to do.
    Nothing,
}

/// The source's handover state and who its destination is.
#[derive(Debug)]
pub struct Source {
    own_pid: u32,
    state: SourceState,
    /// The destination: its process id and the connection it registered on.
    peer: Option<(u32, u64)>,
}

impl Source {
    /// An idle source (this process is `own_pid`).
    pub fn new(own_pid: u32) -> Self {
        Self {
            own_pid,
            state: SourceState::Idle,
            peer: None,
        }
    }

    /// The state now.
    pub fn state(&self) -> SourceState {
        self.state
    }

    /// The destination's process id, if one is (or was, once retired)
    /// registered.
    pub fn peer_pid(&self) -> Option<u32> {
        self.peer.map(|(pid, _)| pid)
    }

    /// True while a handover holds the device suspended or released: an
    /// exit now leaves the files to the destination.
    pub fn passing(&self) -> bool {
        matches!(
            self.state,
            SourceState::Suspended
                | SourceState::Passed
                | SourceState::Released
                | SourceState::Retired
        )
    }

    /// Why a control command other than the handover's is refused, if it is
    /// (a retired source answers nothing but this).
    pub fn refusal(&self) -> Option<String> {
        match (self.state, self.peer) {
            (SourceState::Retired, Some((pid, _))) => Some(format!(
                "this instance (pid {}) handed its disk over to pid {pid} and is exiting; ask \
                 pid {pid} (its control socket)",
                self.own_pid
            )),
            _ => None,
        }
    }

    /// The step `step` arrived on connection `conn`: the action to take, or
    /// why it is refused (the state is then unchanged).
    pub fn on(&mut self, conn: u64, step: Step) -> Result<Action, String> {
        use SourceState as S;
        if let Some(why) = self.refusal() {
            return Err(why);
        }
        if let Step::Register { pid } = step {
            return match (self.state, self.peer) {
                (S::Idle, _) => {
                    self.state = S::Registered;
                    self.peer = Some((pid, conn));
                    Ok(Action::Register)
                }
                (state, Some((peer, _))) => Err(format!(
                    "a handover is pending: pid {own} is handing its disk over to pid {peer} \
                     (state {state}); at most one new instance may take a disk over. Wait for \
                     pid {peer} to finish, or stop it (the handover then aborts and pid {own} \
                     serves on)",
                    own = self.own_pid,
                    state = state.name()
                )),
                (state, None) => Err(format!("handover state {} without a peer", state.name())),
            };
        }
        match self.peer {
            Some((_, c)) if c == conn => {}
            _ if step == Step::Abort => return Ok(Action::Nothing),
            Some((pid, _)) => {
                return Err(format!(
                    "only the registered destination (pid {pid}) drives this handover"
                ))
            }
            None => return Err("no handover is registered: register first".into()),
        }
        let (next, action) = match (self.state, step) {
            (_, Step::Register { .. }) | (S::Idle, _) => {
                return Err("no handover is registered: register first".into())
            }
            (S::Registered, Step::Suspend) => (S::Suspended, Action::SuspendAndPass),
            (S::Passed, Step::Commit) => (S::Released, Action::Release),
            (S::Released, Step::Live) => (S::Retired, Action::Retire),
            (S::Registered, Step::Abort) => (S::Idle, Action::Nothing),
            (S::Suspended | S::Passed, Step::Abort) => {
                (S::Idle, Action::Resume { released: false })
            }
            (S::Released, Step::Abort) => (S::Idle, Action::Resume { released: true }),
            (state, step) => {
                return Err(format!(
                    "handover step {step:?} is out of order (this instance is {})",
                    state.name()
                ))
            }
        };
        self.state = next;
        if next == S::Idle {
            self.peer = None;
        }
        Ok(action)
    }

    /// The files went to the destination (after [`Action::SuspendAndPass`]).
    pub fn passed(&mut self) {
        if self.state == SourceState::Suspended {
            self.state = SourceState::Passed;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{Action, Source, SourceState as S, Step};

    const B: u64 = 7;

    fn at(state: S) -> Source {
        let mut s = Source::new(100);
        let steps: &[Step] = match state {
            S::Idle => &[],
            S::Registered => &[Step::Register { pid: 200 }],
            S::Suspended => &[Step::Register { pid: 200 }, Step::Suspend],
            S::Passed | S::Released | S::Retired => &[Step::Register { pid: 200 }, Step::Suspend],
        };
        for &st in steps {
            s.on(B, st).unwrap();
        }
        if matches!(state, S::Passed | S::Released | S::Retired) {
            s.passed();
        }
        if matches!(state, S::Released | S::Retired) {
            s.on(B, Step::Commit).unwrap();
        }
        if state == S::Retired {
            s.on(B, Step::Live).unwrap();
        }
        assert_eq!(s.state(), state);
        s
    }

    #[test]
    fn a_handover_runs_register_suspend_pass_commit_live() {
        let mut s = Source::new(100);
        assert_eq!(s.on(B, Step::Register { pid: 200 }), Ok(Action::Register));
        assert_eq!(s.state(), S::Registered);
        assert!(!s.passing(), "a registered source still serves");
        assert_eq!(s.on(B, Step::Suspend), Ok(Action::SuspendAndPass));
        assert_eq!(s.state(), S::Suspended);
        assert!(s.passing());
        s.passed();
        assert_eq!(s.state(), S::Passed);
        assert_eq!(s.on(B, Step::Commit), Ok(Action::Release));
        assert_eq!(s.on(B, Step::Live), Ok(Action::Retire));
        assert_eq!(s.state(), S::Retired);
        assert_eq!(s.peer_pid(), Some(200));
    }

    #[test]
    fn a_third_instance_is_refused_in_every_state_and_told_both_pids() {
        for state in [S::Registered, S::Suspended, S::Passed, S::Released] {
            let mut s = at(state);
            let e = s.on(9, Step::Register { pid: 300 }).unwrap_err();
            assert!(
                e.contains("pid 100") && e.contains("pid 200"),
                "{state:?}: {e}"
            );
            assert_eq!(s.state(), state, "a refusal changes nothing");
            assert_eq!(s.peer_pid(), Some(200));
        }
        let e = at(S::Retired)
            .on(9, Step::Register { pid: 300 })
            .unwrap_err();
        assert!(e.contains("handed its disk over to pid 200"), "{e}");
    }

    #[test]
    fn only_the_registered_connection_drives_and_steps_keep_their_order() {
        let mut s = at(S::Registered);
        assert!(s.on(9, Step::Suspend).unwrap_err().contains("pid 200"));
        assert_eq!(
            s.on(9, Step::Abort),
            Ok(Action::Nothing),
            "not its handover"
        );
        assert_eq!(s.state(), S::Registered);
        for wrong in [Step::Commit, Step::Live] {
            assert!(s.on(B, wrong).unwrap_err().contains("out of order"));
        }
        let mut p = at(S::Passed);
        assert!(p.on(B, Step::Suspend).is_err());
        assert!(p.on(B, Step::Live).is_err(), "live only after commit");
        assert!(Source::new(1).on(B, Step::Suspend).is_err());
    }

    #[test]
    fn an_abort_undoes_exactly_what_was_done_in_every_state() {
        let cases = [
            (S::Idle, Action::Nothing),
            (S::Registered, Action::Nothing),
            (S::Suspended, Action::Resume { released: false }),
            (S::Passed, Action::Resume { released: false }),
            (S::Released, Action::Resume { released: true }),
        ];
        for (state, undo) in cases {
            let mut s = at(state);
            assert_eq!(s.on(B, Step::Abort), Ok(undo), "{state:?}");
            assert_eq!(s.state(), S::Idle, "{state:?}");
            assert_eq!(s.peer_pid(), None);
            // Serving again: a new destination may register.
            assert_eq!(s.on(3, Step::Register { pid: 400 }), Ok(Action::Register));
        }
        let mut r = at(S::Retired);
        assert!(
            r.on(B, Step::Abort).is_err(),
            "a retired source stays retired"
        );
        assert_eq!(r.state(), S::Retired);
    }

    #[test]
    fn a_retired_source_refuses_every_command() {
        let s = at(S::Retired);
        let why = s.refusal().unwrap();
        assert!(why.contains("pid 100") && why.contains("pid 200"), "{why}");
        assert!(at(S::Released).refusal().is_none());
    }
}
