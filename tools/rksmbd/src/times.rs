//! The times of SET_INFO FileBasicInformation (MS-FSCC 2.4.7, MS-FSA
//! 2.1.5.14.2): what each FILETIME asks, and the times an open has frozen.
//!
//! A FILETIME of 0 leaves its time as it is; -1 (0xFFFF_FFFF_FFFF_FFFF)
//! leaves it too and stops this open's own changes of the file from
//! moving it; -2 (0xFFFF_FFFF_FFFF_FFFE, SMB 3 and Windows 8 on) leaves it
//! too and lets them move it again. Any other value with the top bit set
//! is a negative time, refused STATUS_INVALID_PARAMETER; every other value
//! is a time, also before 1970 (a negative `time_t`, which Linux stores).
//! Linux sets the access and write times only: the creation and change
//! times are checked and otherwise left.

use std::os::fd::BorrowedFd;

use nix::sys::time::TimeSpec;

use crate::wire::status;

/// 1970-01-01 as a FILETIME (100 ns units since 1601-01-01).
const UNIX_EPOCH: i64 = 116_444_736_000_000_000;

/// What one FILETIME of a FileBasicInformation asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    /// 0: leave the time as it is.
    Keep,
    /// -1: leave it, and let no change made through this open move it.
    Freeze,
    /// -2: leave it, and let changes made through this open move it again.
    Thaw,
    /// Set it to this time since 1970 (negative before 1970).
    To(TimeSpec),
}

impl TimeSet {
    /// Decodes `t`: STATUS_INVALID_PARAMETER for a negative time other
    /// than -1 and -2.
    pub fn of(t: u64) -> Result<TimeSet, u32> {
        match t {
            0 => Ok(TimeSet::Keep),
            u64::MAX => Ok(TimeSet::Freeze),
            0xFFFF_FFFF_FFFF_FFFE => Ok(TimeSet::Thaw),
            t => {
                let t = i64::try_from(t).map_err(|_| status::INVALID_PARAMETER)?;
                // Within i64: t is at least 0.
                let since = t - UNIX_EPOCH;
                Ok(TimeSet::To(TimeSpec::new(
                    since.div_euclid(10_000_000),
                    since.rem_euclid(10_000_000) * 100,
                )))
            }
        }
    }

    /// What `utimensat` is given for it: the time, or UTIME_OMIT.
    pub fn spec(self) -> TimeSpec {
        match self {
            TimeSet::To(t) => t,
            TimeSet::Keep | TimeSet::Freeze | TimeSet::Thaw => TimeSpec::UTIME_OMIT,
        }
    }
}

/// The times of a FileBasicInformation, each decoded: all four are
/// checked before anything is changed, so a refused one changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BasicTimes {
    /// LastAccessTime.
    pub access: TimeSet,
    /// LastWriteTime.
    pub write: TimeSet,
}

impl BasicTimes {
    /// Decodes CreationTime, LastAccessTime, LastWriteTime and ChangeTime;
    /// the creation and change times are only checked.
    pub fn of(creation: u64, access: u64, write: u64, change: u64) -> Result<BasicTimes, u32> {
        TimeSet::of(creation)?;
        TimeSet::of(change)?;
        Ok(BasicTimes {
            access: TimeSet::of(access)?,
            write: TimeSet::of(write)?,
        })
    }
}

/// The times an open's own changes of its file must not move: frozen by
/// a FILETIME of -1, thawed by -2 (Open.UserSetAccessTime and
/// Open.UserSetModificationTime of MS-FSA, set by -1 only: a time a client
/// sets still moves on its next write, as before).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrozenTimes {
    /// The access time.
    pub access: bool,
    /// The write time.
    pub write: bool,
}

impl FrozenTimes {
    /// After a FileBasicInformation's `times` applied.
    pub fn after(self, times: BasicTimes) -> FrozenTimes {
        let next = |was: bool, t: TimeSet| match t {
            TimeSet::Freeze => true,
            TimeSet::Thaw => false,
            TimeSet::Keep | TimeSet::To(_) => was,
        };
        FrozenTimes {
            access: next(self.access, times.access),
            write: next(self.write, times.write),
        }
    }

    /// Whether any time is frozen.
    pub fn any(self) -> bool {
        self.access || self.write
    }

    /// Makes `change`, a change through the open of the file open as `fd`
    /// whose frozen times these are, and puts those times back after it,
    /// whatever it did (the change is answered as it went: putting them
    /// back is best effort).
    pub fn kept_around<T>(self, fd: BorrowedFd<'_>, change: impl FnOnce() -> T) -> T {
        let held = Held::of(fd, self);
        let done = change();
        if let Some(h) = held {
            h.restore(fd);
        }
        done
    }
}

/// The frozen times of a file as they were before a change made through
/// its open.
#[derive(Clone, Copy, Debug)]
struct Held {
    access: TimeSpec,
    write: TimeSpec,
}

impl Held {
    /// The times of the file open as `fd` that `frozen` holds, if any
    /// (None when none is frozen, or the file cannot be read).
    fn of(fd: BorrowedFd<'_>, frozen: FrozenTimes) -> Option<Held> {
        if !frozen.any() {
            return None;
        }
        let st = nix::sys::stat::fstat(fd).ok()?;
        let keep = |on: bool, secs: i64, nsecs: i64| {
            if on {
                TimeSpec::new(secs, nsecs)
            } else {
                TimeSpec::UTIME_OMIT
            }
        };
        Some(Held {
            access: keep(frozen.access, st.st_atime, st.st_atime_nsec),
            write: keep(frozen.write, st.st_mtime, st.st_mtime_nsec),
        })
    }

    /// Puts the held times back on the file open as `fd`.
    fn restore(self, fd: BorrowedFd<'_>) {
        if let Err(e) = libfilter::sys::set_times(fd, *self.access.as_ref(), *self.write.as_ref()) {
            tracing::warn!(error = %e, "frozen times not restored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_minus_one_and_minus_two_leave_the_time() {
        assert_eq!(TimeSet::of(0), Ok(TimeSet::Keep));
        assert_eq!(TimeSet::of(u64::MAX), Ok(TimeSet::Freeze));
        assert_eq!(TimeSet::of(u64::MAX - 1), Ok(TimeSet::Thaw));
        for t in [0, u64::MAX, u64::MAX - 1] {
            assert_eq!(TimeSet::of(t).unwrap().spec(), TimeSpec::UTIME_OMIT);
        }
    }

    #[test]
    fn other_negative_times_are_refused() {
        for t in [u64::MAX - 2, 1 << 63, 0x8000_0000_0000_0001] {
            assert_eq!(TimeSet::of(t), Err(status::INVALID_PARAMETER));
        }
        assert_eq!(
            BasicTimes::of(u64::MAX - 2, 0, 0, 0),
            Err(status::INVALID_PARAMETER)
        );
        assert_eq!(
            BasicTimes::of(0, 0, 0, 1 << 63),
            Err(status::INVALID_PARAMETER)
        );
    }

    #[test]
    fn times_before_1970_are_negative_time_t() {
        // 1969-12-31T23:59:59.9999999Z.
        let t = TimeSet::of(116_444_735_999_999_999).unwrap().spec();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (-1, 999_999_900));
        // 1968-01-01 (smbtorture's time_t_1968).
        let t = TimeSet::of(115_813_152_000_000_000).unwrap().spec();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (-63_158_400, 0));
        // 1601-01-01, the first FILETIME.
        let t = TimeSet::of(1).unwrap().spec();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (-11_644_473_600, 100));
        let t = TimeSet::of(116_444_736_010_000_001).unwrap().spec();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (1, 100));
    }

    #[test]
    fn minus_one_freezes_and_minus_two_thaws() {
        let set = |access, write| BasicTimes { access, write };
        let f = FrozenTimes::default().after(set(TimeSet::Keep, TimeSet::Freeze));
        assert_eq!(
            f,
            FrozenTimes {
                access: false,
                write: true
            }
        );
        let to = TimeSet::To(TimeSpec::new(5, 0));
        let f = f.after(set(TimeSet::Freeze, to));
        assert_eq!(
            f,
            FrozenTimes {
                access: true,
                write: true
            }
        );
        let f = f.after(set(TimeSet::Thaw, TimeSet::Keep));
        assert_eq!(
            f,
            FrozenTimes {
                access: false,
                write: true
            }
        );
        assert!(!f.after(set(TimeSet::Keep, TimeSet::Thaw)).any());
    }
}
