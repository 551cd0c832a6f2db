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
    /// The hold this request took on an on-demand attachment; `None` when the interface was
    /// attached automatically (nothing is held).
    pub lease: Option<Lease>,
}

/// One client's hold on an on-demand attachment. It lapses `ttl_seconds` after it was taken
/// or last renewed (`PUT /attach/{id}/leases/{lease}`), so a client that vanishes without a
/// `DELETE` never keeps programs attached for longer than that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// What `PUT` and `DELETE /attach/{id}/leases/{lease}` take; unique per agent run.
    pub id: u64,
    pub ttl_seconds: u64,
}

impl From<&Attachment> for Attached {
    fn from(a: &Attachment) -> Attached {
        Attached {
            id: a.ifindex,
            iface: a.name.clone(),
            ifindex: a.ifindex,
            role: a.role,
            how: a.how,
            lease: None,
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

/// `POST /attach` with the lease's time to live (the agent's default,
/// [`crate::defaults::LEASE_TTL_SECONDS`], when `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachBody {
    #[serde(flatten)]
    pub target: AttachRequest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}
