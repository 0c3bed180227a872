//! Work split over a few scoped threads, for restart recovery: decoding
//! every stored record and looking at every recovered handle's file are
//! independent per item, and nothing is served yet, so those steps run on
//! every core.

/// Most threads: the work is CPU (decoding) or system calls on cached
/// inodes, so more threads than cores only queue.
pub const THREADS_MAX: usize = 8;

/// `f` of every item, in order, split over one scoped thread per core (at
/// most [`THREADS_MAX`], each given at least `min_per_thread` items; below
/// that, on the calling thread). A thread that cannot be started leaves
/// its part to the calling thread.
pub fn map<I, O, F>(items: &[I], min_per_thread: usize, name: &str, f: F) -> Vec<O>
where
    I: Sync,
    O: Send,
    F: Fn(&I) -> O + Sync,
{
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cores
        .min(THREADS_MAX)
        .min(items.len() / min_per_thread.max(1))
        .max(1);
    let part_of = |part: &[I]| part.iter().map(&f).collect::<Vec<O>>();
    if threads == 1 {
        return part_of(items);
    }
    let per = items.len().div_ceil(threads);
    std::thread::scope(|s| {
        // The calling thread takes the first part itself.
        let mut parts = items.chunks(per);
        let first = parts.next().unwrap_or(&[]);
        let workers: Vec<_> = parts
            .enumerate()
            .map(|(i, part)| {
                let part_of = &part_of;
                (
                    part,
                    std::thread::Builder::new()
                        .name(format!("{name}-{}", i + 1))
                        .spawn_scoped(s, move || part_of(part)),
                )
            })
            .collect();
        let mut out = part_of(first);
        out.reserve(items.len() - out.len());
        for (part, w) in workers {
            match w.map(|t| t.join()) {
                Ok(Ok(done)) => out.extend(done),
                // No thread to spare (or one that panicked, which
                // filterd's panic hook turns into an abort anyway).
                _ => out.extend(part_of(part)),
            }
        }
        out
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn map_keeps_order_at_every_size() {
        for n in [0usize, 1, 7, 100, 10_000] {
            let items: Vec<usize> = (0..n).collect();
            let out = super::map(&items, 16, "test", |i| i * 2);
            assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        }
    }
}
