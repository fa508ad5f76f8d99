//! One committed change, as the revision log holds it and the fan-out delivers it.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::{Key, Labels, Route};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    Spec,
    Status,
    Deleted,
}

impl ChangeKind {
    pub fn code(self) -> i16 {
        match self {
            ChangeKind::Spec => 1,
            ChangeKind::Status => 2,
            ChangeKind::Deleted => 3,
        }
    }

    pub fn from_code(code: i16) -> Option<ChangeKind> {
        match code {
            1 => Some(ChangeKind::Spec),
            2 => Some(ChangeKind::Status),
            3 => Some(ChangeKind::Deleted),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Event {
    pub revision: i64,
    pub key: Key,
    pub uid: Uuid,
    /// The object's generation at this revision.
    pub generation: i64,
    pub change: ChangeKind,
    pub labels: Labels,
    /// The new spec (Spec) or status (Status); none for Deleted, and for a Status change that
    /// removed the author's status (an acknowledged removal).
    pub body: Option<Value>,
    /// Spec author for Spec/Deleted, status author for Status.
    pub author: String,
    pub observed_generation: i64,
    /// Where the object is realised after this change (for Deleted: where it was).
    pub route: Route,
    /// Spec changes that moved the object: where it was realised before.
    pub prev_route: Option<Route>,
    pub at: DateTime<Utc>,
}
