//! A runtime that runs nothing: containers "run" from the moment they start until
//! stopped. Hollow nodes use it for scale tests; it never touches the host.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;

use super::{ContainerHandle, Exit, RunState, Runtime, RuntimeError, StartRequest};

#[derive(Default)]
pub struct FakeRuntime {
    exited: Mutex<HashMap<String, Exit>>,
}

#[async_trait]
impl Runtime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn limits_not_enforced(&self) -> Option<String> {
        Some("the fake runtime runs nothing".into())
    }

    async fn start(&self, req: StartRequest) -> Result<ContainerHandle, RuntimeError> {
        let id = format!("{}_{}_{}", req.pod_uid, req.container, req.attempt);
        self.exited.lock().map(|mut m| m.remove(&id)).ok();
        Ok(ContainerHandle {
            id,
            pid: 0,
            start_ticks: 0,
            state_dir: req.state_dir,
            started_at: Timestamp::now(),
        })
    }

    async fn inspect(&self, h: &ContainerHandle) -> RunState {
        match self.exited.lock().ok().and_then(|m| m.get(&h.id).cloned()) {
            Some(e) => RunState::Exited(e),
            None => RunState::Running,
        }
    }

    async fn stop(&self, h: &ContainerHandle, _grace: Duration) {
        let exit = Exit {
            exit_code: 0,
            signal: None,
            finished_at: Timestamp::now(),
            reason: Some("Completed".into()),
            message: None,
        };
        self.exited
            .lock()
            .map(|mut m| m.insert(h.id.clone(), exit))
            .ok();
    }

    async fn exec(
        &self,
        _h: &ContainerHandle,
        _argv: &[String],
        _env: &[(String, String)],
        _timeout: Duration,
    ) -> Result<i32, RuntimeError> {
        Ok(0)
    }

    async fn usage(&self, _h: &ContainerHandle) -> Option<(u64, u64)> {
        None
    }
}
