//! smbshim's open table ([`OpenTable`]): the opens by file id, indexed by
//! the (client GUID, create GUID) each was made with.
//!
//! A replayed CREATE asks whether its peer already holds the open of its
//! create GUID (then the replay takes no slot of the peer's share). That
//! was a scan of every open of every peer under the table's lock, which
//! every CREATE and CLOSE takes, on each replay: a peer replaying random
//! GUIDs made everyone's opens and closes wait on it (re-review rr45g
//! F5). The index answers it in one lookup. It is kept by the table's own
//! `insert`, `remove` and `retain`; reads go straight to the map. An
//! open's client and create GUID are never changed in place (`get_mut`
//! and `values_mut` hand out opens whose other fields may change).

use std::collections::HashMap;
use std::ops::Deref;

/// What an open is named by in a replayed CREATE: its client's GUID and
/// its create GUID, if it was made with one.
pub(crate) trait ByCreateGuid {
    fn create_guid_of(&self) -> Option<(uuid::Uuid, uuid::Uuid)>;
}

/// The opens by file id, and the file ids of each (client GUID, create
/// GUID).
pub(crate) struct OpenTable<V> {
    opens: HashMap<String, V>,
    by_guid: HashMap<(uuid::Uuid, uuid::Uuid), Vec<String>>,
}

impl<V> Default for OpenTable<V> {
    fn default() -> Self {
        OpenTable {
            opens: HashMap::new(),
            by_guid: HashMap::new(),
        }
    }
}

impl<V> Deref for OpenTable<V> {
    type Target = HashMap<String, V>;

    fn deref(&self) -> &HashMap<String, V> {
        &self.opens
    }
}

impl<V: ByCreateGuid> OpenTable<V> {
    /// The opens made with `client`'s create GUID `guid`.
    pub(crate) fn by_create_guid(
        &self,
        client: uuid::Uuid,
        guid: uuid::Uuid,
    ) -> impl Iterator<Item = &V> + '_ {
        self.by_guid
            .get(&(client, guid))
            .into_iter()
            .flatten()
            .filter_map(|id| self.opens.get(id))
    }

    /// Stores `open` under `file_id`; the open it replaces, if any.
    pub(crate) fn insert(&mut self, file_id: String, open: V) -> Option<V> {
        if let Some(g) = open.create_guid_of() {
            let ids = self.by_guid.entry(g).or_default();
            if !ids.contains(&file_id) {
                ids.push(file_id.clone());
            }
        }
        let old = self.opens.insert(file_id.clone(), open);
        if let Some(g) = old.as_ref().and_then(ByCreateGuid::create_guid_of) {
            let still = self
                .opens
                .get(&file_id)
                .and_then(ByCreateGuid::create_guid_of);
            if still != Some(g) {
                self.unindex(g, &file_id);
            }
        }
        old
    }

    /// Stores `open` under `file_id` unless an open is stored there
    /// already (then `open` is dropped).
    pub(crate) fn insert_if_absent(&mut self, file_id: String, open: V) {
        if !self.opens.contains_key(&file_id) {
            self.insert(file_id, open);
        }
    }

    /// Takes the open of `file_id` out.
    pub(crate) fn remove(&mut self, file_id: &str) -> Option<V> {
        let open = self.opens.remove(file_id)?;
        if let Some(g) = open.create_guid_of() {
            self.unindex(g, file_id);
        }
        Some(open)
    }

    /// Keeps only the opens `keep` says to.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&String, &mut V) -> bool) {
        let mut gone = Vec::new();
        self.opens.retain(|id, v| {
            let kept = keep(id, v);
            if !kept {
                gone.extend(v.create_guid_of().map(|g| (g, id.clone())));
            }
            kept
        });
        for (g, id) in gone {
            self.unindex(g, &id);
        }
    }

    /// The open of `file_id`, to change (never its client or create GUID).
    pub(crate) fn get_mut(&mut self, file_id: &str) -> Option<&mut V> {
        self.opens.get_mut(file_id)
    }

    /// Every open, to change (never its client or create GUID).
    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut V> + '_ {
        self.opens.values_mut()
    }

    fn unindex(&mut self, g: (uuid::Uuid, uuid::Uuid), file_id: &str) {
        if let Some(ids) = self.by_guid.get_mut(&g) {
            ids.retain(|id| id != file_id);
            if ids.is_empty() {
                self.by_guid.remove(&g);
            }
        }
    }

    /// How many (client GUID, create GUID) are indexed (the tests'
    /// measure).
    #[cfg(test)]
    fn indexed(&self) -> usize {
        self.by_guid.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct O(Option<(uuid::Uuid, uuid::Uuid)>);

    impl ByCreateGuid for O {
        fn create_guid_of(&self) -> Option<(uuid::Uuid, uuid::Uuid)> {
            self.0
        }
    }

    /// The index follows every way an open comes and goes: stored,
    /// replaced under its file id, removed, dropped by `retain`.
    #[test]
    fn the_create_guid_index_follows_the_table() {
        let (c, g1, g2) = (
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
        );
        let mut t = OpenTable::default();
        let found = |t: &OpenTable<O>, g| t.by_create_guid(c, g).count();
        t.insert("f1".into(), O(Some((c, g1))));
        t.insert("f2".into(), O(Some((c, g2))));
        t.insert("f3".into(), O(None));
        assert_eq!((found(&t, g1), found(&t, g2), t.indexed()), (1, 1, 2));
        assert_eq!(t.by_create_guid(g1, g1).count(), 0, "another client's");
        // Replaced by an open of another GUID under the same file id.
        t.insert("f1".into(), O(Some((c, g2))));
        assert_eq!((found(&t, g1), found(&t, g2), t.indexed()), (0, 2, 1));
        t.insert("f1".into(), O(Some((c, g2))));
        assert_eq!(found(&t, g2), 2, "stored again, indexed once");
        assert!(t.remove("f1").is_some());
        assert_eq!(found(&t, g2), 1);
        t.retain(|id, _| id != "f2");
        assert_eq!((found(&t, g2), t.indexed(), t.len()), (0, 0, 1));
        assert!(t.remove("f3").is_some());
        assert!(t.is_empty());
    }
}
