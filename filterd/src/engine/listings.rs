//! The `Files` and `Locks` listings, a page at a time: by file id, and —
//! for a connection granted `FEATURE_PAGED_WITHIN_FILE` — inside a file,
//! by holder or by lock, so no file's holders or locks, however many or
//! long, make a reply larger than a frame. Before (review rvcx), a page
//! held whole files: 700 opens of one file, or a file's 256 locks with
//! 200-byte lock owners, made a reply filterd could not encode, and the
//! listing failed at that file on every try. A page is built from the
//! files it lists only (the `Locks` listing built every file's lock views
//! for each page before).

use std::ops::Bound;

use super::durable::PendingChanges;
use super::*;
use libfilter::locks::{LockKind, LockRange};
use libfilter::proto::{FileHolder, LockCursor, PAGE_BYTES};

/// What one file contributes to a page: `items` (its holders, its locks)
/// after a part common to them (`head`, `head_len` bytes: its path).
struct Group<H, I> {
    file: FileId,
    head: H,
    head_len: usize,
    items: Vec<I>,
}

/// Where a page stopped, if files remain: the file to pass as the next
/// request's `after`, and whether the page ended inside it (the caller
/// then names its last item as the cursor within the file).
type PageEnd = Option<(FileId, bool)>;

/// The bytes a file id and its field names take in a page, about.
const FILE_ID_BYTES: usize = 96;

/// More holders of a file than a page can hold (each is more than 48
/// bytes of JSON: its resume key alone is 44): a page is made from the
/// first this many after the cursor.
const HOLDERS_PER_PAGE_MAX: usize = 2 * PAGE_BYTES / 48;

/// `item`'s size as JSON (no smaller than its binary form).
fn json_len<T: serde::Serialize>(item: &T) -> usize {
    serde_json::to_vec(item).map_or(PAGE_BYTES, |v| v.len())
}

/// Fills a page of about `PAGE_BYTES` from `groups`, in listing order.
/// A file that fits what is left goes in whole. One that does not is
/// split, with `within`: as many of its items as fit go in (at least one
/// on a page that is otherwise empty), and the page ends inside it.
/// Without `within` (a client that cannot resume inside a file) the page
/// ends before it — unless the page is empty, when it is cut to what
/// fits and the rest of its items are left off, the one thing such a
/// client can be given (a whole one could not be sent).
fn fill_page<H, I: serde::Serialize>(
    groups: impl Iterator<Item = Group<H, I>>,
    within: bool,
) -> (Vec<Group<H, I>>, PageEnd) {
    let mut out: Vec<Group<H, I>> = Vec::new();
    let mut bytes = 0usize;
    for mut g in groups {
        if g.items.is_empty() {
            continue;
        }
        let sizes: Vec<usize> = g.items.iter().map(|i| json_len(i) + 1).collect();
        let whole = g.head_len + sizes.iter().sum::<usize>();
        if bytes + whole <= PAGE_BYTES {
            bytes += whole;
            out.push(g);
            continue;
        }
        let fresh = out.is_empty();
        let before = out.last().map(|p| p.file);
        if let (false, Some(prev)) = (within, before) {
            return (out, Some((prev, false)));
        }
        let mut used = bytes + g.head_len;
        let mut taken = 0;
        for n in sizes {
            if used + n > PAGE_BYTES && !(fresh && taken == 0) {
                break;
            }
            used += n;
            taken += 1;
        }
        if taken == 0 {
            return (out, before.map(|prev| (prev, false)));
        }
        let left_off = g.items.len() - taken;
        g.items.truncate(taken);
        let file = g.file;
        if !within && left_off > 0 {
            warn!(%file, listed = taken, left_off, "a listing page cut a file's entries: the client cannot page inside a file (FEATURE_PAGED_WITHIN_FILE)");
        }
        out.push(g);
        return (out, Some((file, within)));
    }
    (out, None)
}

/// Where a listing resumes: after file `after`, or — the previous page
/// having ended inside it (`cursor`, honoured only `within`) — inside it.
fn start<C>(
    after: Option<FileId>,
    cursor: Option<C>,
    within: bool,
) -> (Bound<FileId>, Option<(FileId, C)>) {
    match (after, cursor.filter(|_| within)) {
        (Some(f), Some(c)) => (Bound::Included(f), Some((f, c))),
        (Some(f), None) => (Bound::Excluded(f), None),
        (None, _) => (Bound::Unbounded, None),
    }
}

/// A lock's place in its file's table order (`LockTable`).
fn lock_order(l: &Lock<ResumeKey>) -> (LockRange, LockKind, ResumeKey) {
    (l.range, l.kind, l.owner)
}

impl Engine {
    /// A page of `Handles`: handles after `after`, by resume key; with
    /// `durable`, only those no pending commit changes.
    pub(super) fn handles_page(
        &self,
        after: Option<ResumeKey>,
        durable: Option<&PendingChanges>,
    ) -> Reply {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let range = self
            .handles
            .range((from, Bound::Unbounded))
            .filter(|(_, h)| durable.is_none_or(|p| !p.changes(&h.rec)));
        let (handles, next) = page(range.map(|(_, h)| self.view(h)), |v| v.record.key);
        Reply::Handles {
            handles,
            next,
            commit_wait: None,
        }
    }

    /// A page of `Files`: files after `after` (inside it after holder
    /// `holders_after`), each file's holders by resume key; with
    /// `durable`, only the files no pending commit changes.
    pub(super) fn files_page(
        &self,
        conn: ConnId,
        after: Option<FileId>,
        holders_after: Option<ResumeKey>,
        durable: Option<&PendingChanges>,
    ) -> Reply {
        let within = self.granted(conn, proto::FEATURE_PAGED_WITHIN_FILE);
        let (from, resume) = start(after, holders_after, within);
        let groups = self
            .by_file
            .range((from, Bound::Unbounded))
            .filter(|(file, _)| durable.is_none_or(|p| !p.files.contains(file)))
            .filter_map(|(file, keys)| {
                let mut hs: Vec<&Handle> = keys
                    .iter()
                    .filter_map(|k| self.handles.get(k).map(|h| &**h))
                    .collect();
                // The path of the file's first open: the same on every
                // page the file is split across.
                let path = hs.first()?.rec.path.clone();
                if let Some((_, k)) = resume.filter(|(f, _)| f == file) {
                    hs.retain(|h| h.rec.key > k);
                }
                // The first of them by key, no more than a page can hold,
                // chosen without sorting them all: a file split over many
                // pages costs each page one pass over its holders
                // (re-review rr37d: each page sorted and sized every
                // holder, quadratic in a file's opens on the engine
                // thread).
                if hs.len() > HOLDERS_PER_PAGE_MAX {
                    hs.select_nth_unstable_by_key(HOLDERS_PER_PAGE_MAX, |h| h.rec.key);
                    hs.truncate(HOLDERS_PER_PAGE_MAX);
                }
                hs.sort_by_key(|h| h.rec.key);
                let items = hs
                    .iter()
                    .map(|h| FileHolder {
                        key: h.rec.key,
                        access: h.rec.access,
                        share: h.rec.share,
                        durability: h.rec.durability,
                        conn: h.rec.conn,
                    })
                    .collect();
                Some(Group {
                    file: *file,
                    head_len: FILE_ID_BYTES + json_len(&path),
                    head: path,
                    items,
                })
            });
        let (groups, end) = fill_page(groups, within);
        let next_holder = match end {
            Some((_, true)) => groups.last().and_then(|g| g.items.last()).map(|h| h.key),
            _ => None,
        };
        let files = groups
            .into_iter()
            .map(|g| FileView {
                file: g.file,
                path: g.head,
                holders: g.items,
            })
            .collect();
        Reply::Files {
            files,
            next: end.map(|(f, _)| f),
            next_holder,
            commit_wait: None,
        }
    }

    /// A page of `Locks`: files after `after` (inside it after lock
    /// `locks_after`), each file's locks in its table's order; with
    /// `durable`, only the files no pending commit changes.
    pub(super) fn locks_page(
        &self,
        conn: ConnId,
        after: Option<FileId>,
        locks_after: Option<LockCursor>,
        durable: Option<&PendingChanges>,
    ) -> Reply {
        let within = self.granted(conn, proto::FEATURE_PAGED_WITHIN_FILE);
        let (from, resume) = start(after, locks_after, within);
        let groups = self
            .locks
            .range((from, Bound::Unbounded))
            .filter(|(file, _)| durable.is_none_or(|p| !p.files.contains(file)))
            .map(|(file, table)| {
                let locks = table.locks();
                // Past the cursor's lock: past every lock before it in
                // the table's order, and past as many locks equal to it
                // (a handle's stacked shared locks of one range) as the
                // pages before listed.
                let skip = match resume {
                    Some((f, c)) if f == *file => {
                        let at = (c.range, c.kind, c.key);
                        let lo = locks.partition_point(|l| lock_order(l) < at);
                        let hi = locks.partition_point(|l| lock_order(l) <= at);
                        (lo + c.nth as usize + 1).min(hi)
                    }
                    _ => 0,
                };
                Group {
                    file: *file,
                    head: skip,
                    head_len: 0,
                    items: locks
                        .iter()
                        .skip(skip)
                        .map(|l| self.lock_view(*file, l))
                        .collect(),
                }
            });
        let (groups, end) = fill_page(groups, within);
        let next_lock = match end {
            Some((file, true)) => groups.last().and_then(|g| {
                let last = g.items.last()?;
                let at = (last.range, last.kind, last.key);
                // Its place among the locks equal to it.
                let locks = self.locks.get(&file)?.locks();
                let upto = g.head + g.items.len();
                let lo = locks.partition_point(|l| lock_order(l) < at);
                Some(LockCursor {
                    range: last.range,
                    kind: last.kind,
                    key: last.key,
                    nth: u32::try_from(upto.saturating_sub(lo + 1)).unwrap_or(u32::MAX),
                })
            }),
            _ => None,
        };
        let locks = groups.into_iter().flat_map(|g| g.items).collect();
        Reply::Locks {
            locks,
            next: end.map(|(f, _)| f),
            next_lock,
            commit_wait: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(ino: u64) -> FileId {
        FileId { dev: 1, ino }
    }

    /// A file of `n` items of about 1 KiB each.
    fn group(ino: u64, n: usize) -> Group<(), String> {
        Group {
            file: file(ino),
            head: (),
            head_len: 0,
            items: (0..n).map(|i| format!("{i:01000}")).collect(),
        }
    }

    fn lens(page: &[Group<(), String>]) -> Vec<(u64, usize)> {
        page.iter().map(|g| (g.file.ino, g.items.len())).collect()
    }

    /// Within: a file larger than what is left of the page is split, the
    /// page ending inside it; a file larger than a page comes in parts.
    #[test]
    fn a_page_ends_inside_a_file_that_does_not_fit() {
        let per_page = PAGE_BYTES / 1003;
        let (page, end) = fill_page([group(1, 10), group(2, 100)].into_iter(), true);
        assert_eq!(lens(&page), [(1, 10), (2, per_page - 10)]);
        assert_eq!(end, Some((file(2), true)));
        let (page, end) = fill_page([group(1, 10)].into_iter(), true);
        assert_eq!((lens(&page), end), (vec![(1, 10)], None));
    }

    /// Without `within` (an older client): whole files, the page ending
    /// before one that does not fit; a file larger than a page on its
    /// own is cut to what fits, the page ending after it.
    #[test]
    fn without_paging_inside_a_file_a_page_holds_whole_files_or_one_cut() {
        let per_page = PAGE_BYTES / 1003;
        let (page, end) = fill_page(
            [group(1, 10), group(2, 100), group(3, 1)].into_iter(),
            false,
        );
        assert_eq!((lens(&page), end), (vec![(1, 10)], Some((file(1), false))));
        let (page, end) = fill_page([group(2, 100), group(3, 1)].into_iter(), false);
        assert_eq!(
            (lens(&page), end),
            (vec![(2, per_page)], Some((file(2), false)))
        );
    }

    /// An item larger than a page still goes out, alone: a page is never
    /// empty while items remain (the listing would not move on).
    #[test]
    fn a_page_holds_at_least_one_item() {
        let big = Group {
            file: file(1),
            head: (),
            head_len: 0,
            items: vec!["x".repeat(PAGE_BYTES)],
        };
        let (page, end) = fill_page([big, group(2, 1)].into_iter(), true);
        assert_eq!((lens(&page), end), (vec![(1, 1)], Some((file(1), true))));
    }
}
