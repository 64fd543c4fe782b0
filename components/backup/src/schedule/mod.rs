//! Who schedules: the elected instance runs snapshots, retention, drills
//! and the delta recorder on its ticks.
//!
//! | module | owns |
//! |---|---|
//! | [`ticks`] | interval and cron ticks |
//! | [`election`] | the etcd election of the instance that does scheduled work |
//! | [`service`] | the scheduler and the state behind `GetStatus` |

pub mod election;
pub mod service;
pub mod ticks;
