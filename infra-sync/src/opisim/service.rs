//! The four gRPC services, each a thin layer over [`Store`].

use std::sync::Arc;

use tonic::{Request, Response, Status};
use xpu_proto::opi::evpn_gw::{
    self as gw, bridge_port_service_server::BridgePortService, logical_bridge_service_server::LogicalBridgeService,
    svi_service_server::SviService, vrf_service_server::VrfService,
};

use super::{
    kinds::{BridgeKind, PortKind, SviKind, VrfKind},
    store::Store,
};

#[derive(Clone)]
pub(crate) struct SimService {
    pub(crate) store: Arc<Store>,
}

type Rpc<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl LogicalBridgeService for SimService {
    async fn create_logical_bridge(&self, req: Request<gw::CreateLogicalBridgeRequest>) -> Rpc<gw::LogicalBridge> {
        let r = req.into_inner();
        self.store.create::<BridgeKind>(&r.logical_bridge_id, r.logical_bridge).map(Response::new)
    }

    async fn list_logical_bridges(
        &self,
        req: Request<gw::ListLogicalBridgesRequest>,
    ) -> Rpc<gw::ListLogicalBridgesResponse> {
        let r = req.into_inner();
        let (logical_bridges, next_page_token) = self.store.list::<BridgeKind>(r.page_size, &r.page_token)?;
        Ok(Response::new(gw::ListLogicalBridgesResponse { logical_bridges, next_page_token }))
    }

    async fn get_logical_bridge(&self, req: Request<gw::GetLogicalBridgeRequest>) -> Rpc<gw::LogicalBridge> {
        self.store.get::<BridgeKind>(&req.into_inner().name).map(Response::new)
    }

    async fn delete_logical_bridge(&self, req: Request<gw::DeleteLogicalBridgeRequest>) -> Rpc<()> {
        let r = req.into_inner();
        self.store.delete::<BridgeKind>(&r.name, r.allow_missing).map(Response::new)
    }

    async fn update_logical_bridge(&self, req: Request<gw::UpdateLogicalBridgeRequest>) -> Rpc<gw::LogicalBridge> {
        let r = req.into_inner();
        self.store.update::<BridgeKind>(r.logical_bridge, r.update_mask, r.allow_missing).map(Response::new)
    }
}

#[tonic::async_trait]
impl BridgePortService for SimService {
    async fn create_bridge_port(&self, req: Request<gw::CreateBridgePortRequest>) -> Rpc<gw::BridgePort> {
        let r = req.into_inner();
        self.store.create::<PortKind>(&r.bridge_port_id, r.bridge_port).map(Response::new)
    }

    async fn list_bridge_ports(&self, req: Request<gw::ListBridgePortsRequest>) -> Rpc<gw::ListBridgePortsResponse> {
        let r = req.into_inner();
        let (bridge_ports, next_page_token) = self.store.list::<PortKind>(r.page_size, &r.page_token)?;
        Ok(Response::new(gw::ListBridgePortsResponse { bridge_ports, next_page_token }))
    }

    async fn get_bridge_port(&self, req: Request<gw::GetBridgePortRequest>) -> Rpc<gw::BridgePort> {
        self.store.get::<PortKind>(&req.into_inner().name).map(Response::new)
    }

    async fn delete_bridge_port(&self, req: Request<gw::DeleteBridgePortRequest>) -> Rpc<()> {
        let r = req.into_inner();
        self.store.delete::<PortKind>(&r.name, r.allow_missing).map(Response::new)
    }

    async fn update_bridge_port(&self, req: Request<gw::UpdateBridgePortRequest>) -> Rpc<gw::BridgePort> {
        let r = req.into_inner();
        self.store.update::<PortKind>(r.bridge_port, r.update_mask, r.allow_missing).map(Response::new)
    }
}

#[tonic::async_trait]
impl VrfService for SimService {
    async fn create_vrf(&self, req: Request<gw::CreateVrfRequest>) -> Rpc<gw::Vrf> {
        let r = req.into_inner();
        self.store.create::<VrfKind>(&r.vrf_id, r.vrf).map(Response::new)
    }

    async fn list_vrfs(&self, req: Request<gw::ListVrfsRequest>) -> Rpc<gw::ListVrfsResponse> {
        let r = req.into_inner();
        let (vrfs, next_page_token) = self.store.list::<VrfKind>(r.page_size, &r.page_token)?;
        Ok(Response::new(gw::ListVrfsResponse { vrfs, next_page_token }))
    }

    async fn get_vrf(&self, req: Request<gw::GetVrfRequest>) -> Rpc<gw::Vrf> {
        self.store.get::<VrfKind>(&req.into_inner().name).map(Response::new)
    }

    async fn delete_vrf(&self, req: Request<gw::DeleteVrfRequest>) -> Rpc<()> {
        let r = req.into_inner();
        self.store.delete::<VrfKind>(&r.name, r.allow_missing).map(Response::new)
    }

    async fn update_vrf(&self, req: Request<gw::UpdateVrfRequest>) -> Rpc<gw::Vrf> {
        let r = req.into_inner();
        self.store.update::<VrfKind>(r.vrf, r.update_mask, r.allow_missing).map(Response::new)
    }
}

#[tonic::async_trait]
impl SviService for SimService {
    async fn create_svi(&self, req: Request<gw::CreateSviRequest>) -> Rpc<gw::Svi> {
        let r = req.into_inner();
        self.store.create::<SviKind>(&r.svi_id, r.svi).map(Response::new)
    }

    async fn list_svis(&self, req: Request<gw::ListSvisRequest>) -> Rpc<gw::ListSvisResponse> {
        let r = req.into_inner();
        let (svis, next_page_token) = self.store.list::<SviKind>(r.page_size, &r.page_token)?;
        Ok(Response::new(gw::ListSvisResponse { svis, next_page_token }))
    }

    async fn get_svi(&self, req: Request<gw::GetSviRequest>) -> Rpc<gw::Svi> {
        self.store.get::<SviKind>(&req.into_inner().name).map(Response::new)
    }

    async fn delete_svi(&self, req: Request<gw::DeleteSviRequest>) -> Rpc<()> {
        let r = req.into_inner();
        self.store.delete::<SviKind>(&r.name, r.allow_missing).map(Response::new)
    }

    async fn update_svi(&self, req: Request<gw::UpdateSviRequest>) -> Rpc<gw::Svi> {
        let r = req.into_inner();
        self.store.update::<SviKind>(r.svi, r.update_mask, r.allow_missing).map(Response::new)
    }
}
