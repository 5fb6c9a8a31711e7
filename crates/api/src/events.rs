//! Events about pods, as every component that reports one writes it.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;

/// Who reports, about which pod (or other namespaced object).
pub struct PodRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: Option<&'a str>,
}

/// A new Event (`count: 1`, stamped now) about `pod`; `warning` picks the type.
pub fn pod_event(
    pod: PodRef<'_>,
    component: &str,
    host: Option<String>,
    warning: bool,
    reason: &str,
    message: &str,
) -> Event {
    object_event("v1", "Pod", pod, component, host, warning, reason, message)
}

/// A new Event about any namespaced object (`kind` in `api_version`).
#[allow(clippy::too_many_arguments)]
pub fn object_event(
    api_version: &str,
    kind: &str,
    obj: PodRef<'_>,
    component: &str,
    host: Option<String>,
    warning: bool,
    reason: &str,
    message: &str,
) -> Event {
    let pod = obj;
    let now = Timestamp::now();
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", pod.name)),
            namespace: Some(pod.namespace.to_owned()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
            name: Some(pod.name.to_owned()),
            namespace: Some(pod.namespace.to_owned()),
            uid: pod.uid.map(str::to_owned),
            ..Default::default()
        },
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        type_: Some(if warning { "Warning" } else { "Normal" }.into()),
        source: Some(EventSource {
            component: Some(component.to_owned()),
            host,
        }),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        reporting_component: Some(component.to_owned()),
        count: Some(1),
        ..Default::default()
    }
}
