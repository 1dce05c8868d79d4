//! kiln's throttle engine. Rust decides, Python acts: no clocks, I/O or logging in here.

pub mod caps;
pub mod classify;
pub mod decision;
pub mod engine;
pub mod error;
pub mod gcra;
pub mod limiter;
pub mod pick;
pub mod protocol;
pub mod reserve;
pub mod resp;
pub mod scheduler;
pub mod server;
pub mod socketmap;
pub mod state;
pub mod suppress;

pub use decision::{Decision, Reason, Tier};
pub use engine::Engine;
pub use error::{CoreError, CoreResult};
pub use limiter::{Limits, Usage, MAX_NOW_MS};
pub use state::Snapshot;

#[cfg(feature = "python")]
mod bindings;
