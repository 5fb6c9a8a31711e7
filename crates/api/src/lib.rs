//! Meridian's API: the resource registry (what kinds exist, where they live, how they
//! are validated), Kubernetes `Status` errors, label and field selectors, and our own
//! kinds in `meridian.io/v1alpha1`. No I/O and no async here.

pub mod cron;
pub mod defaults;
pub mod duration;
pub mod error;
pub mod events;
pub mod geo;
pub mod managed;
pub mod meridian;
pub mod onboarding;
pub mod openapi;
pub mod owners;
pub mod quantity;
pub mod resources;
pub mod selectors;
pub mod smp;
pub mod validation;

pub use error::{ApiError, Cause, Reason};
pub use resources::{Resource, Scope, TenantAccess};

/// Pod status reason a region sets on pods of a node lost for longer than their
/// grace: marked for rescheduling (an eviction).
pub const NODE_LOST_REASON: &str = "NodeLost";

/// Objects per page when a component lists (or relists) every pod: a relist of a
/// million pods at kube's default of 500 a page was 2,000 requests and half a
/// minute in which the scheduler saw no new pod.
pub const POD_LIST_PAGE: u32 = 5000;
