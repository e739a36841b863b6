//! Distributed queries: a principal's statement, planned over the same
//! policy views as a local query, run by a Ballista cluster (a scheduler
//! and its executors) over the same Delta tables.
//!
//! The plan that leaves this process is the principal's plan over its
//! views: each view ([`PolicyView`]) travels whole, with its own plan over
//! the table's files ([`TableFiles`]), and is planned on the scheduler
//! into the same [`BarrierExec`] as here, so the policy holds exactly as
//! in a local query (a licensee's view aggregates before any of its
//! expressions run). [`PlanCodec`] and [`ExecCodec`] are what the client,
//! the scheduler and every executor encode and decode those nodes with;
//! `fleetgate ballista` runs a scheduler and executors that use them.
//!
//! Only plans made of SQL travel: a view that decrypts fields (keys held
//! by this node only), a user's or a third party's view (they name the
//! vehicles' VINs and pseudonyms) and the query audit stay local, and a
//! distributed query that needs one is refused.

use std::collections::HashSet;
use std::sync::Arc;

use ballista_core::extension::{SessionConfigExt, SessionStateExt};
use ballista_core::serde::{BallistaLogicalExtensionCodec, BallistaPhysicalExtensionCodec};
use datafusion::catalog::TableProvider;
use datafusion::common::TableReference;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{Extension, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::bytes::{
    logical_plan_from_bytes_with_extension_codec, logical_plan_to_bytes_with_extension_codec,
};
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};

use super::barrier::{BarrierExec, PolicyView};
use crate::store::TableFiles;

/// Marks fleetgate's nodes in an encoded plan. A protobuf message (what
/// Ballista's codecs write) cannot start with these bytes: 0x66 would be
/// field 12 with wire type 6, which does not exist.
const FILES: &[u8] = b"fleetgate-files\0";
const VIEW: &[u8] = b"fleetgate-view\0";
const BARRIER: &[u8] = b"fleetgate-barrier\0";

/// Encodes fleetgate's table providers (policy views, table files) and
/// hands everything else to Ballista's codec.
#[derive(Debug, Default)]
pub struct PlanCodec {
    ballista: BallistaLogicalExtensionCodec,
}

/// A policy view on the wire: its columns passed through unchanged, then
/// its plan.
#[derive(serde::Serialize, serde::Deserialize)]
struct ViewHeader {
    passed_through: Vec<String>,
}

impl LogicalExtensionCodec for PlanCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[LogicalPlan],
        ctx: &TaskContext,
    ) -> Result<Extension> {
        self.ballista.try_decode(buf, inputs, ctx)
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> Result<()> {
        self.ballista.try_encode(node, buf)
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: arrow::datatypes::SchemaRef,
        ctx: &TaskContext,
    ) -> Result<Arc<dyn TableProvider>> {
        if let Some(listing) = buf.strip_prefix(FILES) {
            return Ok(Arc::new(TableFiles::decode(listing, schema)?));
        }
        if let Some(view) = buf.strip_prefix(VIEW) {
            let (header, plan) = split_header(view)?;
            let header: ViewHeader =
                serde_json::from_slice(header).map_err(|e| DataFusionError::External(e.into()))?;
            let plan = logical_plan_from_bytes_with_extension_codec(plan, ctx, self)?;
            let passed_through: HashSet<String> = header.passed_through.into_iter().collect();
            return Ok(Arc::new(PolicyView::from_parts(plan, passed_through)));
        }
        self.ballista
            .try_decode_table_provider(buf, table_ref, schema, ctx)
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn TableProvider>,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        if let Some(files) = node.downcast_ref::<TableFiles>() {
            buf.extend_from_slice(FILES);
            buf.extend_from_slice(&files.encode()?);
            return Ok(());
        }
        if let Some(view) = node.downcast_ref::<PolicyView>() {
            let (plan, passed_through) = view.parts();
            let mut passed_through: Vec<String> = passed_through.iter().cloned().collect();
            passed_through.sort();
            let header = serde_json::to_vec(&ViewHeader { passed_through })
                .map_err(|e| DataFusionError::External(e.into()))?;
            let plan = logical_plan_to_bytes_with_extension_codec(plan, self)?;
            buf.extend_from_slice(VIEW);
            buf.extend_from_slice(&(header.len() as u64).to_le_bytes());
            buf.extend_from_slice(&header);
            buf.extend_from_slice(&plan);
            return Ok(());
        }
        self.ballista
            .try_encode_table_provider(table_ref, node, buf)
    }

    fn try_decode_file_format(
        &self,
        buf: &[u8],
        ctx: &TaskContext,
    ) -> Result<Arc<dyn datafusion::datasource::file_format::FileFormatFactory>> {
        self.ballista.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(
        &self,
        buf: &mut Vec<u8>,
        node: Arc<dyn datafusion::datasource::file_format::FileFormatFactory>,
    ) -> Result<()> {
        self.ballista.try_encode_file_format(buf, node)
    }
}

/// A length-prefixed header and what follows it.
fn split_header(bytes: &[u8]) -> Result<(&[u8], &[u8])> {
    let malformed = || DataFusionError::Plan("a policy view's encoding is cut short".into());
    let (length, rest) = bytes.split_first_chunk::<8>().ok_or_else(malformed)?;
    let length = usize::try_from(u64::from_le_bytes(*length)).map_err(|_| malformed())?;
    if rest.len() < length {
        return Err(malformed());
    }
    Ok(rest.split_at(length))
}

/// Encodes the policy barrier and hands every other node to Ballista's codec.
#[derive(Debug, Default)]
pub struct ExecCodec {
    ballista: BallistaPhysicalExtensionCodec,
}

impl PhysicalExtensionCodec for ExecCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if buf == BARRIER {
            return match inputs {
                [input] => Ok(Arc::new(BarrierExec::new(Arc::clone(input)))),
                _ => Err(DataFusionError::Plan(
                    "a policy barrier has exactly one input".into(),
                )),
            };
        }
        self.ballista.try_decode(buf, inputs, ctx, proto)
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        if node.downcast_ref::<BarrierExec>().is_some() {
            buf.extend_from_slice(BARRIER);
            return Ok(());
        }
        self.ballista.try_encode(node, buf, proto)
    }
}

/// `state` (a principal's session, views planned over [`TableFiles`]) with
/// its plans sent to the Ballista scheduler at `scheduler` (`df://host:port`)
/// instead of run here. Only for a plan already made: Ballista's state has
/// every built-in function again, including those a principal's session
/// leaves out.
pub fn on_cluster(state: SessionState, scheduler: &str) -> Result<SessionState> {
    let config = state
        .config()
        .clone()
        .with_ballista_logical_extension_codec(Arc::new(PlanCodec::default()))
        .with_ballista_physical_extension_codec(Arc::new(ExecCodec::default()));
    let state = datafusion::execution::SessionStateBuilder::new_from_existing(state)
        .with_config(config)
        .build();
    let url = url::Url::parse(scheduler)
        .map_err(|e| DataFusionError::Configuration(format!("{scheduler}: {e}")))?;
    let host = url.host_str().ok_or_else(|| {
        DataFusionError::Configuration(format!("{scheduler}: no host (df://host:port)"))
    })?;
    let port = url.port().unwrap_or(50050);
    state.upgrade_for_ballista(format!("http://{host}:{port}"))
}
