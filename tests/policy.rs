//! Issue 17 §2: which Calico policy dropped a flow (filled in below).
