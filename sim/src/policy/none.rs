//! No management: the initial placement stays as it is.
use crate::cluster::Cluster;
use crate::policy::detect::Detector;
use crate::policy::lrmmt::{packed_initial, restart_pabfd};
use crate::policy::{Move, Policy};

pub struct NoMigration;

impl Policy for NoMigration {
    fn name(&self) -> String {
        "none".into()
    }
    fn initial_placement(&mut self, c: &Cluster) -> Vec<Option<usize>> {
        packed_initial(c)
    }
    fn restart(&mut self, c: &Cluster, vms: &[usize]) -> Vec<Option<usize>> {
        restart_pabfd(c, vms, Detector::Lr(1.2))
    }
    fn evacuate(&mut self, c: &Cluster, h: usize) -> Vec<Move> {
        crate::policy::lrmmt::evacuate_pabfd(c, h, Detector::Lr(1.2))
    }
    fn optimize(&mut self, _c: &Cluster, _t: f64) -> Vec<Move> {
        Vec::new()
    }
}
