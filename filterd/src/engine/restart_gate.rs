//! The open gate after a restart: opens wait until the frontends seen
//! before it have resynced.
//!
//! A restarted filterd has no record of the non-persistent handles it had
//! (nor of their leases), so it would grant an open that conflicts with a
//! lease a live frontend's client still caches under — an RWH lease's
//! client writing into its cache while another frontend's client opens
//! the file for writing, sharing nothing. The frontend learns which
//! handles were forgotten only when it reattaches (`Reattached::lost`)
//! and then breaks those leases to none; until it has, no open may be
//! granted that the forgotten lease would have broken. filterd cannot
//! know which files those were, so every open of an existing file waits
//! (a stat open, which breaks nothing, and a create, whose file nobody
//! had, do not) until every instance named in `STATE/frontends.seen`
//! whose process is still alive has resynced: sent `Request::Resynced`
//! (`proto::FEATURE_RESYNCED`: the frontend has sent its breaks) or, for
//! one that did not ask for that feature, said hello — that process
//! itself: another one under its name speaks not for its clients
//! (`Engine::another_ran_before_restart`). An instance's own
//! opens do not wait for it — unless they come from another process than
//! the one seen before, which still runs (`Engine::own_frontend_exempt`;
//! the same for a lock's waits). At the break timeout after the first open
//! that waited, the instances still not back are given up and struck
//! off, as for a first lock (`locks::Engine::hint_first`); a dead one
//! costs nothing. A `no_wait` open is answered `Busy` instead.
//!
//! A local process's open (fanotify, `local_access`) waits at the same
//! gate, whatever its file: filterd cannot tell which files had the
//! forgotten leases, nor a local open that creates its file from one
//! that does not (the permission event says neither), so while the gate
//! is closed every local open of the export waits — at most until the
//! gate's deadline — and the reader allows none by itself
//! (`local_open_is_plain`).

use super::*;

impl Engine {
    /// Whether an open by `me` (`None`: a local process's) must wait for
    /// frontends seen before the restart to resync; starts the gate's
    /// deadline if so.
    pub(super) fn restart_gate_closed(&mut self, me: Option<&InstanceName>) -> bool {
        let closed = self.restart_gate_holds(me);
        if closed && self.restart_gate_deadline.is_none() {
            self.restart_gate_deadline = Some(mono_ms() + self.cfg.break_timeout_ms);
            info!(
                frontends = self.restart_unsettled.len(),
                "opens wait for the frontends attached before the restart to resync"
            );
        }
        closed
    }

    /// [`Engine::restart_gate_closed`] without starting the deadline.
    pub(super) fn restart_gate_holds(&self, me: Option<&InstanceName>) -> bool {
        self.restart_unsettled
            .iter()
            .any(|i| Some(i) != me && !self.hint_gave_up.contains(i))
    }

    /// Parks an open of `file` behind the gate (see
    /// [`Engine::restart_gate_closed`]).
    pub(super) fn restart_gate_hold(&mut self, file: FileId) {
        self.stats.opens_waited_for_frontends += 1;
        self.restart_gate_files.insert(file);
    }

    /// Parks a local process's open of `file` behind the gate, as
    /// [`Engine::restart_gate_hold`] does a frontend's: it is decided
    /// again (`on_local_open`) when the gate opens or its deadline
    /// passes. Its permission event stays with the reader's answerer,
    /// whose verdict deadline (the break timeout + 2 s) is past the
    /// gate's whenever this open started it.
    pub(super) fn restart_gate_hold_local(
        &mut self,
        file: FileId,
        pid: i32,
        reply: LocalReply,
        fd: Arc<OwnedFd>,
    ) {
        self.stats.local_opens_waited_for_frontends += 1;
        debug!(pid, %file, "local open after a restart waits for the frontends seen before it");
        if self.park_local(file, pid, reply, fd) {
            self.restart_gate_files.insert(file);
        }
    }

    /// `instance` has resynced (or said hello without
    /// `FEATURE_RESYNCED`): opens stop waiting for it; those parked run
    /// again (and wait on if another instance is still away).
    pub(super) fn restart_settled(&mut self, instance: &InstanceName) {
        if self.restart_unsettled.remove(instance) {
            debug!(%instance, "frontend seen before the restart resynced");
            self.restart_gate_reopen();
        }
    }

    /// `conn` sent `Resynced`.
    pub(super) fn frontend_resynced(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let Role::Frontend { instance, .. } = &*c.role else {
            return;
        };
        // Another process under the name of one still running says
        // nothing of the old one's clients.
        if self.another_ran_before_restart(instance, c.peer.pid) {
            return;
        }
        let instance = instance.clone();
        self.restart_settled(&instance);
    }

    /// The gate's deadline passed: the instances still not resynced are
    /// given up — one not attached is struck off `frontends.seen` until it
    /// attaches again, as for a first lock; one attached (said hello, no
    /// `Resynced` yet) stays remembered for the next restart — and the
    /// parked opens proceed.
    pub(super) fn restart_gate_due(&mut self, now: u64) {
        if self.restart_gate_deadline.is_none_or(|d| d > now) {
            return;
        }
        self.restart_gate_deadline = None;
        for i in std::mem::take(&mut self.restart_unsettled) {
            warn!(instance = %i, "frontend attached before the restart did not resync in time: opens proceed");
            if !self.instances.contains_key(&i) {
                self.hint_give_up(i);
            }
        }
        self.restart_gate_reopen();
    }

    fn restart_gate_reopen(&mut self) {
        if self.restart_unsettled.is_empty() {
            self.restart_gate_deadline = None;
        }
        let files = std::mem::take(&mut self.restart_gate_files);
        self.retry_files.extend(files);
    }
}
