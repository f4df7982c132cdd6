//! A CRI client: the calls the kubelet makes to a container runtime
//! (`runtime.v1.RuntimeService`), as unary gRPC over the runtime's unix
//! socket.
//!
//! The messages are the subset of the CRI protos (`k8s.io/cri-api`,
//! `pkg/apis/runtime/v1/api.proto`) this harness sends and reads, declared
//! with `prost` derives and the protos' field numbers; protobuf skips the
//! fields a message here does not declare. No `protoc` at build time. The
//! gRPC framing (a 5-byte length prefix, `grpc-status` in the trailers) is
//! done over `h2` directly.

use std::{collections::HashMap, path::Path};

use bytes::{BufMut as _, Bytes, BytesMut};
use prost::Message;

/// `runtime.v1.PodSandboxMetadata`.
#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
}

/// `runtime.v1.LinuxPodSandboxConfig` (`cgroup_parent` only).
#[derive(Clone, PartialEq, Message)]
pub struct LinuxPodSandboxConfig {
    #[prost(string, tag = "1")]
    pub cgroup_parent: String,
}

/// `runtime.v1.PodSandboxConfig`.
#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(string, tag = "2")]
    pub hostname: String,
    #[prost(string, tag = "3")]
    pub log_directory: String,
    #[prost(map = "string, string", tag = "6")]
    pub labels: HashMap<String, String>,
    #[prost(map = "string, string", tag = "7")]
    pub annotations: HashMap<String, String>,
    #[prost(message, optional, tag = "8")]
    pub linux: Option<LinuxPodSandboxConfig>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RunPodSandboxRequest {
    #[prost(message, optional, tag = "1")]
    pub config: Option<PodSandboxConfig>,
    #[prost(string, tag = "2")]
    pub runtime_handler: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct RunPodSandboxResponse {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

/// `StopPodSandboxRequest`, `RemovePodSandboxRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxIdRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxStatusRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxNetworkStatus {
    #[prost(string, tag = "1")]
    pub ip: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxStatus {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
    /// 0 = SANDBOX_READY.
    #[prost(int32, tag = "3")]
    pub state: i32,
    #[prost(message, optional, tag = "5")]
    pub network: Option<PodSandboxNetworkStatus>,
    #[prost(map = "string, string", tag = "7")]
    pub labels: HashMap<String, String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<PodSandboxStatus>,
    /// Verbose only: runtime-specific JSON (containerd: key `info`).
    #[prost(map = "string, string", tag = "2")]
    pub info: HashMap<String, String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ContainerMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "2")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct ImageSpec {
    #[prost(string, tag = "1")]
    pub image: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Mount {
    #[prost(string, tag = "1")]
    pub container_path: String,
    #[prost(string, tag = "2")]
    pub host_path: String,
    #[prost(bool, tag = "3")]
    pub readonly: bool,
}

/// `runtime.v1.ContainerConfig`.
#[derive(Clone, PartialEq, Message)]
pub struct ContainerConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<ContainerMetadata>,
    #[prost(message, optional, tag = "2")]
    pub image: Option<ImageSpec>,
    #[prost(string, repeated, tag = "3")]
    pub command: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    pub args: Vec<String>,
    #[prost(message, repeated, tag = "7")]
    pub mounts: Vec<Mount>,
    #[prost(map = "string, string", tag = "9")]
    pub labels: HashMap<String, String>,
    #[prost(map = "string, string", tag = "10")]
    pub annotations: HashMap<String, String>,
    #[prost(string, tag = "11")]
    pub log_path: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct CreateContainerRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(message, optional, tag = "2")]
    pub config: Option<ContainerConfig>,
    #[prost(message, optional, tag = "3")]
    pub sandbox_config: Option<PodSandboxConfig>,
}

#[derive(Clone, PartialEq, Message)]
pub struct CreateContainerResponse {
    #[prost(string, tag = "1")]
    pub container_id: String,
}

/// `StartContainerRequest`, `RemoveContainerRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct ContainerIdRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ContainerStatusRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct ContainerStatus {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<ContainerMetadata>,
    /// 1 = CONTAINER_RUNNING.
    #[prost(int32, tag = "3")]
    pub state: i32,
    #[prost(map = "string, string", tag = "12")]
    pub labels: HashMap<String, String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ContainerStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<ContainerStatus>,
    /// Verbose only: containerd's `info` JSON (`pid`, `sandboxID`, ...).
    #[prost(map = "string, string", tag = "2")]
    pub info: HashMap<String, String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct VersionRequest {
    #[prost(string, tag = "1")]
    pub version: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct VersionResponse {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub runtime_name: String,
    #[prost(string, tag = "3")]
    pub runtime_version: String,
    #[prost(string, tag = "4")]
    pub runtime_api_version: String,
}

/// The empty responses (`StopPodSandboxResponse`, `StartContainerResponse`, ...).
#[derive(Clone, PartialEq, Message)]
pub struct Empty {}

/// `CONTAINER_RUNNING` of `runtime.v1.ContainerState`.
pub const CONTAINER_RUNNING: i32 = 1;
/// `SANDBOX_READY` of `runtime.v1.PodSandboxState`.
pub const SANDBOX_READY: i32 = 0;

/// A failed call: transport trouble or a non-zero `grpc-status`.
#[derive(Debug)]
pub struct CriError(pub String);

impl std::fmt::Display for CriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CriError {}

fn err(what: impl std::fmt::Display) -> CriError {
    CriError(what.to_string())
}

/// A runtime's CRI endpoint (a unix socket); each call opens a connection
/// of its own (a handful of calls per test).
pub struct CriClient {
    socket: std::path::PathBuf,
    rt: tokio::runtime::Runtime,
}

/// The gRPC status of a response: from the trailers, or from the headers
/// of a trailers-only response. None when neither carries one.
fn grpc_status(h: &http::HeaderMap) -> Option<(u32, String)> {
    let code = h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
    let msg = h
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Some((code, msg))
}

/// The single message of a unary response body (5-byte prefix: compressed
/// flag, big-endian length).
fn unframe(body: &[u8]) -> Result<&[u8], CriError> {
    if body.len() < 5 {
        return Err(err(format!(
            "response of {} bytes, no gRPC frame",
            body.len()
        )));
    }
    if body[0] != 0 {
        return Err(err("compressed gRPC response (none was offered)"));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    body.get(5..5 + len).ok_or_else(|| {
        err(format!(
            "gRPC frame of {len} bytes, {} received",
            body.len() - 5
        ))
    })
}

impl CriClient {
    pub fn new(socket: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        Self {
            socket: socket.to_path_buf(),
            rt,
        }
    }

    /// One unary call of `runtime.v1.RuntimeService/<method>`.
    pub fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        req: &Req,
    ) -> Result<Resp, CriError> {
        let path = format!("/runtime.v1.RuntimeService/{method}");
        let socket = self.socket.clone();
        let mut frame = BytesMut::with_capacity(5 + req.encoded_len());
        frame.put_u8(0);
        frame.put_u32(req.encoded_len() as u32);
        req.encode(&mut frame).map_err(err)?;
        self.rt.block_on(async move {
            let io = tokio::net::UnixStream::connect(&socket)
                .await
                .map_err(|e| err(format!("connect {}: {e}", socket.display())))?;
            let (client, conn) = h2::client::handshake(io).await.map_err(err)?;
            let driver = tokio::spawn(conn);
            let mut client = client.ready().await.map_err(err)?;
            let request = http::Request::post(format!("http://localhost{path}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .map_err(err)?;
            let (response, mut send) = client.send_request(request, false).map_err(err)?;
            send.send_data(frame.freeze(), true).map_err(err)?;
            let response = response.await.map_err(err)?;
            let (head, mut body) = response.into_parts();
            if let Some((code, msg)) = grpc_status(&head.headers).filter(|(c, _)| *c != 0) {
                return Err(err(format!("{method}: gRPC status {code}: {msg}")));
            }
            let mut data = BytesMut::new();
            while let Some(chunk) = body.data().await {
                let chunk: Bytes = chunk.map_err(err)?;
                let _ = body.flow_control().release_capacity(chunk.len());
                data.extend_from_slice(&chunk);
            }
            let trailers = body.trailers().await.map_err(err)?.unwrap_or_default();
            driver.abort();
            match grpc_status(&trailers).or_else(|| grpc_status(&head.headers)) {
                Some((0, _)) => {}
                Some((code, msg)) => {
                    return Err(err(format!("{method}: gRPC status {code}: {msg}")));
                }
                None => return Err(err(format!("{method}: no gRPC status in the response"))),
            }
            Resp::decode(unframe(&data)?).map_err(|e| err(format!("{method}: {e}")))
        })
    }

    pub fn version(&self) -> Result<VersionResponse, CriError> {
        self.call("Version", &VersionRequest::default())
    }

    pub fn run_pod_sandbox(&self, config: &PodSandboxConfig) -> Result<String, CriError> {
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let r: RunPodSandboxResponse = self.call("RunPodSandbox", &req)?;
        Ok(r.pod_sandbox_id)
    }

    pub fn pod_sandbox_status(&self, id: &str) -> Result<PodSandboxStatusResponse, CriError> {
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: id.to_owned(),
            verbose: true,
        };
        self.call("PodSandboxStatus", &req)
    }

    pub fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let req = PodSandboxIdRequest {
            pod_sandbox_id: id.to_owned(),
        };
        self.call::<_, Empty>("StopPodSandbox", &req).map(drop)
    }

    pub fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let req = PodSandboxIdRequest {
            pod_sandbox_id: id.to_owned(),
        };
        self.call::<_, Empty>("RemovePodSandbox", &req).map(drop)
    }

    pub fn create_container(
        &self,
        sandbox_id: &str,
        config: &ContainerConfig,
        sandbox_config: &PodSandboxConfig,
    ) -> Result<String, CriError> {
        let req = CreateContainerRequest {
            pod_sandbox_id: sandbox_id.to_owned(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox_config.clone()),
        };
        let r: CreateContainerResponse = self.call("CreateContainer", &req)?;
        Ok(r.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), CriError> {
        let req = ContainerIdRequest {
            container_id: id.to_owned(),
        };
        self.call::<_, Empty>("StartContainer", &req).map(drop)
    }

    pub fn container_status(&self, id: &str) -> Result<ContainerStatusResponse, CriError> {
        let req = ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: true,
        };
        self.call("ContainerStatus", &req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_field_numbers() {
        // CreateContainerResponse{container_id: "ab"}: field 1, wire type 2.
        let r = CreateContainerResponse {
            container_id: "ab".into(),
        };
        assert_eq!(r.encode_to_vec(), [0x0a, 2, b'a', b'b']);
        let framed = [0, 0, 0, 0, 4, 0x0a, 2, b'a', b'b'];
        assert_eq!(
            CreateContainerResponse::decode(unframe(&framed).unwrap()).unwrap(),
            r
        );
        assert!(unframe(&framed[..6]).is_err());
        assert!(unframe(&[1, 0, 0, 0, 0]).is_err());
        // LinuxPodSandboxConfig is field 8 of PodSandboxConfig.
        let c = PodSandboxConfig {
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: "p".into(),
            }),
            ..Default::default()
        };
        assert_eq!(c.encode_to_vec(), [0x42, 3, 0x0a, 1, b'p']);
    }
}
