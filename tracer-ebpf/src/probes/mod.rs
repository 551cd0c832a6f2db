//! One file per kernel hook.
pub mod kfree_skb;
pub mod tc;
