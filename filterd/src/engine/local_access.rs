//! Local access: the engine's verdict on a local process's open
//! (fanotify, see `crate::local`).

use super::*;

impl Engine {
    /// Turns local-access mediation on.
    pub fn set_fanotify(
        &mut self,
        fan: Arc<nix::sys::fanotify::Fanotify>,
        counters: Arc<crate::local::LocalCounters>,
        scope: crate::local::MarkScope,
    ) {
        self.mediation = scope.word().to_owned();
        self.fanotify = Some(fan);
        self.local_counters = counters;
    }

    /// Decides a local process's open: it counts as a read that shares
    /// everything (share modes that exclude readers refuse it); conflicting
    /// caching leases are broken first, the open waiting for the acks.
    pub(super) fn on_local_open(&mut self, file: FileId, pid: i32, fd: OwnedFd, reply: LocalReply) {
        use crate::local::Verdict;
        let holders = self.holders_of(file);
        if holders.is_empty() {
            // No protocol state: ignore this file's opens from now on.
            if let Some(fan) = &self.fanotify {
                crate::local::ignore(fan, &fd, &self.local_counters);
            }
            reply.send(Verdict::Allow);
            return;
        }
        match share::decide(ShareMode::LOCAL_PROCESS, holders) {
            ShareDecision::Violation | ShareDecision::NotAvailable => {
                debug!(pid, %file, "local open refused by a protocol share mode");
                reply.send(Verdict::Deny);
                return;
            }
            ShareDecision::Grant { purge } => {
                for k in purge {
                    self.purge(k);
                }
            }
        }
        if self.break_leases_for(file, None, ShareMode::LOCAL_PROCESS, None) {
            self.waiting_local.push((file, reply, fd));
            return;
        }
        reply.send(Verdict::Allow);
    }
}
