//! `meridian tenant create NAME`: creates a tenant and writes its kubeconfig.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use clap::Subcommand;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use meridian_apiserver::kubeconfig;

#[derive(Subcommand)]
pub enum TenantCommand {
    /// Create a tenant (if it does not exist) and write a kubeconfig with a new token.
    Create {
        name: String,
        /// The server's data directory (for the admin kubeconfig).
        #[arg(long, default_value = ".meridian")]
        data_dir: PathBuf,
        /// Where to write the kubeconfig ("-" prints it); default DATA_DIR/tenants/NAME.kubeconfig.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub async fn run(cmd: TenantCommand) -> Result<()> {
    match cmd {
        TenantCommand::Create {
            name,
            data_dir,
            out,
        } => {
            let path = create_tenant(&data_dir, &name, out.as_deref()).await?;
            if out.as_deref() != Some(Path::new("-")) {
                println!(
                    "tenant {name} is ready; kubeconfig written to {}",
                    path.display()
                );
                println!("  export KUBECONFIG={}", path.display());
            }
            Ok(())
        }
    }
}

fn tenants_api(client: kube::Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("meridian.io", "v1alpha1", "Tenant");
    Api::all_with(client, &ApiResource::from_gvk_with_plural(&gvk, "tenants"))
}

/// Creates `name` through the API (admin credentials from `data_dir`) and writes a
/// kubeconfig for it. Returns where it was written.
pub async fn create_tenant(data_dir: &Path, name: &str, out: Option<&Path>) -> Result<PathBuf> {
    let admin_path = data_dir.join("admin.kubeconfig");
    let admin = kube::config::Kubeconfig::read_from(&admin_path).with_context(|| {
        format!(
            "reading {} (is the server running with this --data-dir?)",
            admin_path.display()
        )
    })?;
    let cluster = admin
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .ok_or_else(|| anyhow!("{} has no cluster", admin_path.display()))?;
    let server = cluster.server.clone().unwrap_or_default();
    let ca_pem = std::fs::read_to_string(data_dir.join("pki/ca.crt"))
        .context("reading the CA certificate")?;
    let config = kube::Config::from_custom_kubeconfig(admin, &Default::default())
        .await
        .context("loading the admin kubeconfig")?;
    let client = kube::Client::try_from(config).context("building a client")?;
    let api = tenants_api(client);
    let tenant: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "meridian.io/v1alpha1", "kind": "Tenant",
        "metadata": {"name": name}, "spec": {}
    }))?;
    match api.create(&PostParams::default(), &tenant).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e).with_context(|| format!("creating tenant {name}")),
    }
    let issued: serde_json::Value = api
        .create_subresource(
            "token",
            name,
            &PostParams::default(),
            &serde_json::json!({}),
        )
        .await
        .with_context(|| format!("issuing a token for tenant {name}"))?;
    let token = issued["status"]["token"]
        .as_str()
        .ok_or_else(|| anyhow!("the server returned no token"))?;
    let contents = kubeconfig::render(name, &server, &ca_pem, token, Some("default"));
    match out {
        Some(p) if p == Path::new("-") => {
            print!("{contents}");
            Ok(p.to_owned())
        }
        _ => {
            let path = out
                .map(Path::to_owned)
                .unwrap_or_else(|| data_dir.join("tenants").join(format!("{name}.kubeconfig")));
            kubeconfig::write(&path, &contents)
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        }
    }
}
