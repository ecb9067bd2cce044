//! Handler versions, shared by the CLI and the master: the
//! content-addressed store of handler builds ([`store`]) and the record of
//! which version each group is pinned to and has run ([`pins`]).

pub mod pins;
pub mod store;
