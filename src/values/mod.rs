//! Values: the data that configuration and policy both speak of, with no logic of either:
//! the meshes' profiles (annotation names, defaults, rule shapes), port and CIDR lists and
//! their parsing, and a pod's annotations. A leaf: it depends only on `protocol` (for the CNI
//! error a bad value is), and `config` and `policy` depend on it, never the reverse.

pub mod lists;
pub mod profiles;

use std::collections::BTreeMap;

/// A pod's annotations, as the runtime passes them (`io.kubernetes.cri.pod-annotations`).
pub type Annotations = BTreeMap<String, String>;
