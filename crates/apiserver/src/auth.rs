//! Authentication (bearer tokens, stored as hashes) and authorization (who may do
//! which verb on which resource).

use meridian_api::{ApiError, Resource, TenantAccess};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where token records live in the store. Never served over REST.
pub const TOKEN_PREFIX: &str = "/registry/meridian.io/tokens/";

/// The platform's own tenant name, reserved.
pub const SYSTEM_TENANT: &str = "system";

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// Sees and changes everything, across tenants (the global view).
    Admin,
    /// A tenant: a virtual cluster of its own namespaces; Nodes read-only.
    Tenant(String),
    /// A platform component with a fixed role.
    System(SystemRole),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SystemRole {
    /// Regions: Nodes, pod status, events, leases, EdgeClusters.
    Region,
    /// The scheduler: reads pods and nodes, binds pods, writes events.
    Scheduler,
    /// Workload controllers: workloads, pods, events.
    Controllers,
}

impl Identity {
    pub fn user(&self) -> String {
        match self {
            Identity::Admin => "admin".into(),
            Identity::Tenant(t) => format!("tenant:{t}"),
            Identity::System(r) => format!(
                "system:{}",
                serde_json::to_value(r)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ),
        }
    }

    /// The tenant whose virtual cluster this caller sees, if it is a tenant.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Identity::Tenant(t) => Some(t),
            _ => None,
        }
    }
}

/// A stored token record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<SystemRole>,
    pub created: String,
}

impl TokenRecord {
    pub fn identity(&self) -> Option<Identity> {
        match (self.user.as_str(), &self.tenant, self.role) {
            ("admin", _, _) => Some(Identity::Admin),
            (_, Some(t), _) => Some(Identity::Tenant(t.clone())),
            (_, None, Some(r)) => Some(Identity::System(r)),
            _ => None,
        }
    }
}

pub fn token_key(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{TOKEN_PREFIX}{hex}")
}

/// A fresh random token (256 bits, hex).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
}

impl Verb {
    pub const ALL: [Verb; 8] = [
        Verb::Get,
        Verb::List,
        Verb::Watch,
        Verb::Create,
        Verb::Update,
        Verb::Patch,
        Verb::Delete,
        Verb::DeleteCollection,
    ];

    /// The verb named as in RBAC (`get`, `deletecollection`, ...).
    pub fn parse(s: &str) -> Option<Verb> {
        Verb::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
        }
    }

    pub fn is_read(self) -> bool {
        matches!(self, Verb::Get | Verb::List | Verb::Watch)
    }
}

/// Decides whether `who` may do `verb` on `resource` (optionally a subresource).
pub fn authorize(
    who: &Identity,
    verb: Verb,
    resource: &Resource,
    subresource: Option<&str>,
) -> Result<(), ApiError> {
    let allowed = match who {
        Identity::Admin => true,
        Identity::Tenant(_) => match resource.tenant_access {
            TenantAccess::None => false,
            TenantAccess::ReadOnly => verb.is_read(),
            TenantAccess::Own => true,
        },
        Identity::System(role) => system_allows(*role, verb, resource, subresource),
    };
    if allowed {
        Ok(())
    } else {
        let group = if resource.group.is_empty() {
            String::new()
        } else {
            format!(" in API group \"{}\"", resource.group)
        };
        let sub = subresource.map(|s| format!("/{s}")).unwrap_or_default();
        Err(ApiError::forbidden(format!(
            "{} is forbidden: User \"{}\" cannot {} resource \"{}{sub}\"{group}",
            resource.plural,
            who.user(),
            verb.as_str(),
            resource.plural,
        )))
    }
}

fn system_allows(role: SystemRole, verb: Verb, r: &Resource, sub: Option<&str>) -> bool {
    let read = verb.is_read();
    match (role, r.plural) {
        (_, "events") => read || verb == Verb::Create || verb == Verb::Patch,
        (SystemRole::Region, "nodes" | "leases") => true,
        (SystemRole::Region, "pods") => read || sub == Some("status") || verb == Verb::Delete,
        (SystemRole::Region, "bulkpodstatuses" | "bulknodestatuses") => verb == Verb::Create,
        (SystemRole::Region, "edgeclusters") => true,
        (SystemRole::Region, "imageprepulls") => read || sub == Some("status"),
        // One by one, for the pods on its nodes (never a list or watch of them all).
        (SystemRole::Region, "secrets") => verb == Verb::Get,
        (SystemRole::Region, _) => read,
        (SystemRole::Scheduler, "pods") => {
            read || matches!(sub, Some("binding" | "status"))
                || verb == Verb::Update
                || verb == Verb::Patch
        }
        (SystemRole::Scheduler, "leases") => true,
        (SystemRole::Scheduler, "placementpolicies") => read || sub == Some("status"),
        (SystemRole::Scheduler, "bulkbindings") => verb == Verb::Create,
        (SystemRole::Scheduler, _) => read && !matches!(r.plural, "secrets" | "configmaps"),
        (SystemRole::Controllers, "tenants" | "secrets") => false,
        (SystemRole::Controllers, _) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(plural: &str) -> &'static Resource {
        meridian_api::resources::RESOURCES
            .iter()
            .find(|r| r.plural == plural)
            .unwrap()
    }

    #[test]
    fn tenants_read_nodes_but_never_write_them_or_see_tenants() {
        let t = Identity::Tenant("acme".into());
        assert!(authorize(&t, Verb::List, res("nodes"), None).is_ok());
        assert!(authorize(&t, Verb::Delete, res("nodes"), None).is_err());
        assert!(authorize(&t, Verb::Get, res("tenants"), None).is_err());
        assert!(authorize(&t, Verb::Create, res("pods"), None).is_ok());
    }

    #[test]
    fn system_roles_get_only_what_they_need() {
        let s = Identity::System(SystemRole::Scheduler);
        assert!(authorize(&s, Verb::List, res("nodes"), None).is_ok());
        assert!(authorize(&s, Verb::Create, res("pods"), Some("binding")).is_ok());
        assert!(authorize(&s, Verb::Delete, res("pods"), None).is_err());
        assert!(authorize(&s, Verb::Get, res("secrets"), None).is_err());
        let r = Identity::System(SystemRole::Region);
        assert!(authorize(&r, Verb::Update, res("pods"), Some("status")).is_ok());
        assert!(authorize(&r, Verb::Update, res("pods"), None).is_err());
        assert!(authorize(&r, Verb::Create, res("deployments"), None).is_err());
        assert!(authorize(&r, Verb::Get, res("secrets"), None).is_ok());
        assert!(authorize(&r, Verb::List, res("secrets"), None).is_err());
        assert!(authorize(&r, Verb::Watch, res("secrets"), None).is_err());
    }

    #[test]
    fn token_keys_are_hashes_not_tokens() {
        let t = new_token();
        assert_eq!(t.len(), 64);
        let k = token_key(&t);
        assert!(k.starts_with(TOKEN_PREFIX));
        assert!(!k.contains(&t));
    }
}
