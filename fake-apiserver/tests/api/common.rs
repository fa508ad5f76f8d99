//! Shared fixtures: a started server with a client, and the `Widget` custom resource.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use xpu_fake_apiserver::{FakeApiServer, Options};

/// A namespaced custom resource with a status subresource and printer columns.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "example.com",
    version = "v1",
    kind = "Widget",
    namespaced,
    status = "WidgetStatus",
    shortname = "wd",
    printcolumn(name = "Color", type_ = "string", json_path = ".spec.color"),
    printcolumn(name = "Size", type_ = "integer", json_path = ".spec.size", priority = "1"),
    printcolumn(name = "Ready", type_ = "boolean", json_path = ".status.ready")
)]
#[serde(rename_all = "camelCase")]
pub struct WidgetSpec {
    pub color: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WidgetStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_color: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub ready: bool,
}

pub struct Env {
    pub server: FakeApiServer,
    pub client: Client,
}

impl Env {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        let server = FakeApiServer::start_with("127.0.0.1:0".parse().unwrap(), options).await.unwrap();
        let config = kube::Config::new(server.url().parse().unwrap());
        let client = Client::try_from(config).unwrap();
        Self { server, client }
    }

    /// Start, register the `Widget` CRD and wait until it is established.
    pub async fn with_widgets() -> Self {
        let env = Self::start().await;
        env.install_widget_crd().await;
        env
    }

    pub async fn install_widget_crd(&self) {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        crds.create(&PostParams::default(), &Widget::crd()).await.unwrap();
        let established = await_condition(crds, "widgets.example.com", conditions::is_crd_established());
        within(established).await.unwrap();
    }

    pub fn widgets(&self) -> Api<Widget> {
        Api::namespaced(self.client.clone(), "default")
    }
}

pub fn widget(name: &str, color: &str) -> Widget {
    let mut w = Widget::new(name, WidgetSpec { color: color.into(), size: Some(3) });
    w.metadata = ObjectMeta { name: Some(name.into()), ..ObjectMeta::default() };
    w
}

/// Await `f`, failing the test after 10 seconds.
pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f).await.expect("timed out")
}

/// The `Status` code and reason of a failed request.
pub fn api_error(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}
