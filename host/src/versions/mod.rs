//! Handler versions, shared by the CLI and the master: the
//! content-addressed store of handler builds ([`store`]) and the record of
//! which version each group is pinned to and has run ([`pins`]), and what
//! of the store nothing needs any more ([`gc`]).

pub mod gc;
pub mod pins;
pub mod store;
