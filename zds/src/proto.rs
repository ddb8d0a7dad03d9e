//! The messages of `istio.workload.zds` (proto3), as ztunnel's `proto/zds.proto` defines them,
//! written out by hand with prost's derives (no build-time protoc). Field numbers are the
//! protocol: they must match the `.proto`, including `DelWorkload.uid = 2`.

/// `istio.workload.zds.Version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    NotUsed = 0,
    V1 = 1,
}

/// ztunnel's first message on a new connection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ZdsHello {
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

/// Who a workload is, for ztunnel's identity (its certificate) and logs.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct WorkloadInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub service_account: String,
}

/// Serve a workload; sent with the workload's network namespace in `SCM_RIGHTS`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AddWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

/// Keep a workload ztunnel has although the agent cannot open its namespace (snapshot only).
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeepWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
}

/// Stop serving a workload.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DelWorkload {
    #[prost(string, tag = "2")]
    pub uid: String,
}

/// The snapshot is complete: ztunnel drops the workloads it was not sent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotSent {}

/// Agent → ztunnel.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadRequest {
    #[prost(oneof = "workload_request::Payload", tags = "1, 5, 2, 3")]
    pub payload: Option<workload_request::Payload>,
}

pub mod workload_request {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Add(super::AddWorkload),
        #[prost(message, tag = "5")]
        Keep(super::KeepWorkload),
        #[prost(message, tag = "2")]
        Del(super::DelWorkload),
        #[prost(message, tag = "3")]
        SnapshotSent(super::SnapshotSent),
    }
}

/// ztunnel's answer to every request: an empty `error` is success.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    #[prost(string, tag = "1")]
    pub error: String,
}

/// ztunnel → agent, after the hello.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadResponse {
    #[prost(oneof = "workload_response::Payload", tags = "1")]
    pub payload: Option<workload_response::Payload>,
}

pub mod workload_response {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Ack(super::Ack),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Bytes written out from the `.proto` by hand (tag = field << 3 | wire type), so that
    /// a wrong field number in the derives above fails here.
    #[test]
    fn encodings_match_the_proto_field_numbers() {
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        assert_eq!(hello.encode_to_vec(), [0x08, 0x01]);

        let del = WorkloadRequest {
            payload: Some(workload_request::Payload::Del(DelWorkload {
                uid: "u".into(),
            })),
        };
        // field 2 (del), length 3: { field 2 (uid), length 1, "u" }
        assert_eq!(del.encode_to_vec(), [0x12, 0x03, 0x12, 0x01, b'u']);

        let keep = WorkloadRequest {
            payload: Some(workload_request::Payload::Keep(KeepWorkload {
                uid: "u".into(),
            })),
        };
        assert_eq!(keep.encode_to_vec(), [0x2a, 0x03, 0x0a, 0x01, b'u']);

        let snapshot = WorkloadRequest {
            payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
        };
        assert_eq!(snapshot.encode_to_vec(), [0x1a, 0x00]);

        let add = WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: "u".into(),
                workload_info: Some(WorkloadInfo {
                    name: "n".into(),
                    namespace: "s".into(),
                    service_account: "a".into(),
                }),
            })),
        };
        let expected = [
            0x0a, 14, // add, length 14
            0x0a, 1, b'u', // uid
            0x12, 9, // workload_info, length 9
            0x0a, 1, b'n', 0x12, 1, b's', 0x1a, 1, b'a',
        ];
        assert_eq!(add.encode_to_vec(), expected);

        let nack = WorkloadResponse::decode(&[0x0a, 0x04, 0x0a, 0x02, b'n', b'o'][..]).unwrap();
        assert_eq!(
            nack.payload,
            Some(workload_response::Payload::Ack(Ack { error: "no".into() }))
        );
    }
}
