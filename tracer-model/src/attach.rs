//! `POST /attach` and the attachments `/healthz` lists.
use serde::{Deserialize, Serialize};

use crate::{AttachHow, Role};

/// An interface tracer observes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub ifindex: u32,
    pub name: String,
    pub role: Role,
    pub how: AttachHow,
}

/// The body of `POST /attach`'s 201: the attachment, under the names a client uses to let go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    /// What `DELETE /attach/{id}` takes.
    pub id: u32,
    pub iface: String,
    pub ifindex: u32,
    pub role: Role,
    pub how: AttachHow,
}

impl From<&Attachment> for Attached {
    fn from(a: &Attachment) -> Attached {
        Attached {
            id: a.ifindex,
            iface: a.name.clone(),
            ifindex: a.ifindex,
            role: a.role,
            how: a.how,
        }
    }
}

/// The body of `POST /attach`: exactly one of the two.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttachRequest {
    Iface { iface: String },
    Pod { pod: String },
}
