//! `kubectl kustomize DIR` for what deploy/ and its overlays use, so that the node e2e runs
//! the manifests exactly as `kubectl apply -k` sends them: `resources` (files and
//! directories, recursively), `configMapGenerator` (files and literals, `behavior`, labels,
//! the content hash in the name and the DaemonSet's references renamed to it), strategic-merge
//! `patches`, `namespace` and `images`. A key or patch directive this does not know fails by
//! name: a kustomization cannot grow a line that the test silently ignores.
//! `rendered_as_kubectl_kustomize_renders_it` compares the result with kubectl's own
//! rendering, object by object, for deploy/ and every overlay.

use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const KNOWN_KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "configMapGenerator",
    "generatorOptions",
    "patches",
    "images",
];

/// One object on its way through the levels; `hash`: a generated ConfigMap whose name gets
/// the content hash at the end.
struct Res {
    obj: Value,
    hash: bool,
}

fn yaml(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_saphyr::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

fn name_of(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or_default()
}

/// The objects `kubectl kustomize dir` prints (in no particular order).
pub fn build(dir: &Path) -> Vec<Value> {
    let mut res = level(dir, &mut Vec::new());
    // The content hash goes into each generated ConfigMap's name last (kustomize: after every
    // level's transforms), and every reference to the ConfigMap follows it.
    let mut renamed = BTreeMap::new();
    for r in res.iter_mut().filter(|r| r.hash) {
        let old = name_of(&r.obj).to_string();
        let new = format!("{old}-{}", config_map_hash(&r.obj));
        r.obj["metadata"]["name"] = json!(new);
        renamed.insert(old, new);
    }
    for r in &mut res {
        rename_config_map_refs(&mut r.obj, &renamed);
    }
    res.into_iter().map(|r| r.obj).collect()
}

fn level(dir: &Path, seen: &mut Vec<PathBuf>) -> Vec<Res> {
    let canon = std::fs::canonicalize(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    assert!(
        !seen.contains(&canon),
        "{}: a resource cycle",
        dir.display()
    );
    seen.push(canon);
    let kfile = dir.join("kustomization.yaml");
    let k = yaml(&kfile);
    for key in k.as_object().expect("a kustomization is a map").keys() {
        assert!(
            KNOWN_KEYS.contains(&key.as_str()),
            "{}: `{key}` is not rendered by the test (teach tests/node_e2e/kustomize.rs)",
            kfile.display()
        );
    }
    let mut res = Vec::new();
    for r in k["resources"].as_array().into_iter().flatten() {
        let p = dir.join(r.as_str().expect("a resource path"));
        if p.is_dir() {
            res.extend(level(&p, seen));
        } else {
            res.push(Res {
                obj: yaml(&p),
                hash: false,
            });
        }
    }
    let no_hash = k["generatorOptions"]["disableNameSuffixHash"] == true;
    for g in k["configMapGenerator"].as_array().into_iter().flatten() {
        generate(dir, g, no_hash, &mut res);
    }
    for p in k["patches"].as_array().into_iter().flatten() {
        for key in p.as_object().expect("a patch is a map").keys() {
            assert!(
                key == "path" || key == "patch",
                "{}: patches.{key} is not rendered by the test",
                kfile.display()
            );
        }
        let patch: Value = match (p["path"].as_str(), p["patch"].as_str()) {
            (Some(f), None) => yaml(&dir.join(f)),
            (None, Some(text)) => serde_saphyr::from_str(text).expect("an inline patch"),
            _ => panic!("{}: a patch needs path or patch", kfile.display()),
        };
        assert!(
            patch.is_object(),
            "{}: only strategic-merge patches are rendered by the test",
            kfile.display()
        );
        let (kind, name) = (patch["kind"].as_str(), name_of(&patch).to_string());
        let target = res
            .iter_mut()
            .find(|r| r.obj["kind"].as_str() == kind && name_of(&r.obj) == name)
            .unwrap_or_else(|| panic!("{}: no {kind:?} {name} to patch", kfile.display()));
        merge(&mut target.obj, &patch, "");
    }
    if let Some(ns) = k["namespace"].as_str() {
        for r in &mut res {
            r.obj["metadata"]["namespace"] = json!(ns);
        }
    }
    for i in k["images"].as_array().into_iter().flatten() {
        for r in &mut res {
            set_image(&mut r.obj, i);
        }
    }
    res
}

fn generate(dir: &Path, g: &Value, no_hash: bool, res: &mut Vec<Res>) {
    for key in g.as_object().expect("a generator is a map").keys() {
        assert!(
            ["name", "files", "literals", "behavior", "options"].contains(&key.as_str()),
            "configMapGenerator.{key} is not rendered by the test"
        );
    }
    let name = g["name"].as_str().expect("configMapGenerator name");
    let mut data = Map::new();
    for f in g["files"].as_array().into_iter().flatten() {
        let f = f.as_str().expect("a file");
        let (key, path) = f.split_once('=').unwrap_or_else(|| {
            let base = Path::new(f).file_name().and_then(|n| n.to_str());
            (base.expect("a file name"), f)
        });
        let text = std::fs::read_to_string(dir.join(path))
            .unwrap_or_else(|e| panic!("configMapGenerator {name}: {path}: {e}"));
        data.insert(key.to_string(), json!(text));
    }
    for l in g["literals"].as_array().into_iter().flatten() {
        let (k, v) = l
            .as_str()
            .and_then(|l| l.split_once('='))
            .expect("a literal k=v");
        data.insert(k.to_string(), json!(v));
    }
    let opts = &g["options"];
    for key in opts.as_object().into_iter().flatten().map(|(k, _)| k) {
        assert!(
            ["labels", "annotations", "disableNameSuffixHash"].contains(&key.as_str()),
            "configMapGenerator.options.{key} is not rendered by the test"
        );
    }
    let hash = !(no_hash || opts["disableNameSuffixHash"] == true);
    let existing = res
        .iter()
        .position(|r| r.obj["kind"] == "ConfigMap" && name_of(&r.obj) == name);
    let behavior = g["behavior"].as_str().unwrap_or("create");
    let mut obj = match (behavior, existing) {
        ("create", None) => json!({"apiVersion": "v1", "kind": "ConfigMap",
                                   "metadata": {"name": name}, "data": {}}),
        ("merge" | "replace", Some(i)) => res.remove(i).obj,
        (b, e) => panic!("configMapGenerator {name}: behavior {b} with existing {e:?}"),
    };
    if behavior != "merge" {
        obj["data"] = json!({});
    }
    let d = obj["data"].as_object_mut().expect("data");
    d.extend(data);
    for meta in ["labels", "annotations"] {
        for (k, v) in opts[meta].as_object().into_iter().flatten() {
            obj["metadata"][meta][k] = v.clone();
        }
    }
    res.push(Res { obj, hash });
}

/// kustomize's (v5) ConfigMap hash: sha256 of Go's JSON encoding of {data, kind, name: ""}
/// (keys sorted, `<>&` escaped as Go does), its first 10 hex digits with 0 1 3 a e mapped to
/// g h k m t.
fn config_map_hash(cm: &Value) -> String {
    let encoded = json!({"data": cm["data"], "kind": "ConfigMap", "name": ""}).to_string();
    let go = encoded
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029");
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(go.as_bytes())
        .expect("write to sha256sum");
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)[..10]
        .chars()
        .map(|c| match c {
            '0' => 'g',
            '1' => 'h',
            '3' => 'k',
            'a' => 'm',
            'e' => 't',
            c => c,
        })
        .collect()
}

/// The pod template of a workload, if it has one.
fn pod_spec(obj: &mut Value) -> Option<&mut Value> {
    at(obj, &["spec", "template", "spec"])
}

/// `v[k1][k2]…` for changing, without creating what is missing (IndexMut would add nulls).
fn at<'a>(v: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| v.get_mut(*k))
}

/// The elements of the list at `path`, if there is one.
fn items<'a>(v: &'a mut Value, path: &[&str]) -> impl Iterator<Item = &'a mut Value> {
    at(v, path)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
}

fn rename_config_map_refs(obj: &mut Value, renamed: &BTreeMap<String, String>) {
    let Some(spec) = pod_spec(obj) else { return };
    let fix = |v: Option<&mut Value>| {
        if let Some(v) = v {
            if let Some(new) = v.as_str().and_then(|n| renamed.get(n)) {
                *v = json!(new);
            }
        }
    };
    for vol in items(spec, &["volumes"]) {
        fix(at(vol, &["configMap", "name"]));
    }
    for list in ["containers", "initContainers"] {
        for c in items(spec, &[list]) {
            for e in items(c, &["env"]) {
                fix(at(e, &["valueFrom", "configMapKeyRef", "name"]));
            }
            for e in items(c, &["envFrom"]) {
                fix(at(e, &["configMapRef", "name"]));
            }
        }
    }
}

/// kustomize's `images:` transform on a workload's containers.
fn set_image(obj: &mut Value, i: &Value) {
    let Some(spec) = pod_spec(obj) else { return };
    let want = i["name"].as_str().expect("images name");
    for list in ["containers", "initContainers"] {
        for c in items(spec, &[list]) {
            let Some(image) = c.get("image").and_then(Value::as_str) else {
                continue;
            };
            let (name, tag) = match image.split_once('@') {
                Some((n, d)) => (n, format!("@{d}")),
                None => match image.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
                    Some((n, t)) => (n, format!(":{t}")),
                    None => (image, String::new()),
                },
            };
            if name != want {
                continue;
            }
            let name = i["newName"].as_str().unwrap_or(name);
            let tag = match (i["digest"].as_str(), i["newTag"].as_str()) {
                (Some(d), _) => format!("@{d}"),
                (None, Some(t)) => format!(":{t}"),
                (None, None) => tag,
            };
            c["image"] = json!(format!("{name}{tag}"));
        }
    }
}

/// The strategic-merge patch key of a list field (kubernetes' patchMergeKey); lists without
/// one are replaced whole.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "volumes" | "env" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "ports" => Some("containerPort"),
        _ => None,
    }
}

/// Strategic merge of `patch` into `base`: maps merge, `null` deletes, keyed lists merge
/// element by element (the patch's elements first, in its order, then the base's others, as
/// kustomize orders them), other lists and scalars are replaced.
fn merge(base: &mut Value, patch: &Value, field: &str) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                assert!(
                    !k.starts_with('$'),
                    "patch directive {k} is not rendered by the test"
                );
                if v.is_null() {
                    b.remove(k);
                } else if let Some(existing) = b.get_mut(k) {
                    merge(existing, v, k);
                } else {
                    b.insert(k.clone(), v.clone());
                }
            }
        }
        (Value::Array(b), Value::Array(p)) if merge_key(field).is_some() => {
            let key = merge_key(field).unwrap();
            let mut out = Vec::new();
            for item in p {
                let id = &item[key];
                assert!(!id.is_null(), "a patch to {field} without its key {key}");
                match b.iter().position(|x| &x[key] == id) {
                    Some(i) => {
                        let mut x = b.remove(i);
                        merge(&mut x, item, "");
                        out.push(x);
                    }
                    None => out.push(item.clone()),
                }
            }
            out.append(b);
            *b = out;
        }
        (b, p) => *b = p.clone(),
    }
}

/// `kubectl kustomize dir`, parsed: kubectl itself (kustomize built in), no network.
pub fn kubectl_kustomize(dir: &Path) -> Vec<Value> {
    let version = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        version.contains("Kustomize Version: v5"),
        "the manifests' check needs kubectl >= 1.27 (kustomize v5, whose ConfigMap hash this \
         renders), on PATH; found: {version:?}"
    );
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("kubectl: {e}"));
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_saphyr::from_multiple(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|e| panic!("kubectl kustomize {}: {e}", dir.display()))
}

/// deploy/ and every directory of deploy/overlays/, relative to the repository.
pub fn all_dirs() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = vec!["deploy".to_string()];
    let mut overlays: Vec<String> = std::fs::read_dir(root.join("deploy/overlays"))
        .expect("deploy/overlays")
        .flatten()
        .filter(|e| e.path().join("kustomization.yaml").exists())
        .map(|e| format!("deploy/overlays/{}", e.file_name().to_string_lossy()))
        .collect();
    overlays.sort();
    dirs.extend(overlays);
    dirs
}

#[test]
fn rendered_as_kubectl_kustomize_renders_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dirs = all_dirs();
    assert!(dirs.len() > 1, "no overlays in deploy/overlays");
    for dir in dirs {
        let key = |v: &Value| format!("{}/{}", v["kind"].as_str().unwrap_or(""), name_of(v));
        let sorted = |v: Vec<Value>| {
            let mut m: Vec<(String, Value)> = v.into_iter().map(|o| (key(&o), o)).collect();
            m.sort_by(|a, b| a.0.cmp(&b.0));
            m
        };
        let ours = sorted(build(&root.join(&dir)));
        let theirs = sorted(kubectl_kustomize(&root.join(&dir)));
        let names = |m: &[(String, Value)]| m.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        assert_eq!(names(&ours), names(&theirs), "{dir}: objects");
        for ((k, a), (_, b)) in ours.iter().zip(&theirs) {
            assert_eq!(
                a,
                b,
                "{dir}: {k} differs from kubectl kustomize's:\nours:   {}\nkubectl: {}",
                serde_json::to_string_pretty(a).unwrap(),
                serde_json::to_string_pretty(b).unwrap()
            );
        }
    }
}
