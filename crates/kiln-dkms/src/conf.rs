//! `dkms.conf` is bash, so it is evaluated by bash, as dkms does, inside the
//! sandbox (it is arbitrary code). A fixed script sources it with dkms's
//! variables set and writes every variable kiln uses to a file as
//! NUL-separated `name, index, value` records. Regex matches (`MAKE_MATCH`,
//! `PATCH_MATCH`, `BUILD_EXCLUSIVE_KERNEL`/`_ARCH`) are evaluated by bash's
//! own `=~` too, so their semantics are exactly dkms's.

use std::collections::BTreeMap;
use std::path::Path;

use crate::DkmsError;

/// The evaluation script. Arguments: kernelver arch kernel_source_dir
/// dkms_tree source_tree dkms.conf out-file. It never interpolates them
/// into code.
pub(crate) const EVAL: &str = r#"
kernelver=$1 arch=$2 kernel_source_dir=$3 dkms_tree=$4 source_tree=$5 conf=$6 out=$7
exec 3>"$out"
. "$conf" >&2
rec() { printf '%s\0%s\0%s\0' "$1" "$2" "$3" >&3; }
for v in PACKAGE_NAME PACKAGE_VERSION PRE_BUILD POST_BUILD BUILD_EXCLUSIVE_KERNEL \
         BUILD_EXCLUSIVE_KERNEL_MIN BUILD_EXCLUSIVE_KERNEL_MAX BUILD_EXCLUSIVE_ARCH \
         BUILD_EXCLUSIVE_CONFIG; do
  [ -n "${!v+x}" ] && rec "$v" - "${!v}"
done
for a in MAKE MAKE_MATCH PATCH PATCH_MATCH BUILT_MODULE_NAME BUILT_MODULE_LOCATION \
         DEST_MODULE_NAME DEST_MODULE_LOCATION STRIP; do
  eval 'for i in "${!'$a'[@]}"; do rec '$a' "$i" "${'$a'[$i]}"; done'
done
for i in "${!MAKE_MATCH[@]}"; do
  [[ $kernelver =~ ${MAKE_MATCH[$i]} ]] && rec MAKE_MATCHED "$i" 1
done
for i in "${!PATCH[@]}"; do
  if [[ -z ${PATCH_MATCH[$i]-} ]] || [[ $kernelver =~ ${PATCH_MATCH[$i]} ]]; then rec PATCH_APPLIES "$i" 1; fi
done
if [[ -n ${BUILD_EXCLUSIVE_KERNEL-} ]] && ! [[ $kernelver =~ $BUILD_EXCLUSIVE_KERNEL ]]; then rec EXCLUDED - "kernel $kernelver does not match BUILD_EXCLUSIVE_KERNEL=$BUILD_EXCLUSIVE_KERNEL"; fi
if [[ -n ${BUILD_EXCLUSIVE_ARCH-} ]] && ! [[ $arch =~ $BUILD_EXCLUSIVE_ARCH ]]; then rec EXCLUDED - "arch $arch does not match BUILD_EXCLUSIVE_ARCH=$BUILD_EXCLUSIVE_ARCH"; fi
exit 0
"#;

/// What kiln uses of a `dkms.conf`, for one kernel.
#[derive(Debug, Clone, Default)]
pub struct DkmsConf {
    pub name: String,
    pub version: String,
    pub pre_build: Option<String>,
    pub post_build: Option<String>,
    /// The make command for this kernel (MAKE_MATCH applied), before dkms's
    /// `-jN KERNELRELEASE=` insertion. None: dkms's default.
    pub make: Option<String>,
    /// Patches (file names under `patches/`) that apply to this kernel, in order.
    pub patches: Vec<String>,
    pub modules: Vec<ModuleSpec>,
    /// Why this kernel is excluded (BUILD_EXCLUSIVE_KERNEL or _ARCH).
    pub excluded: Option<String>,
    pub exclusive_min: Option<String>,
    pub exclusive_max: Option<String>,
    pub exclusive_config: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSpec {
    pub built_name: String,
    /// Directory below the build dir ("" for the top).
    pub built_location: String,
    pub dest_name: String,
    pub strip: bool,
}

type Records = BTreeMap<String, BTreeMap<String, String>>;

pub(crate) fn parse(bytes: &[u8], conf: &Path) -> Result<DkmsConf, DkmsError> {
    let text = String::from_utf8_lossy(bytes);
    let mut it = text.split('\0');
    let mut recs: Records = BTreeMap::new();
    while let (Some(n), Some(i), Some(v)) = (it.next(), it.next(), it.next()) {
        recs.entry(n.to_string())
            .or_default()
            .insert(i.to_string(), v.to_string());
    }
    let scalar = |n: &str| {
        recs.get(n)
            .and_then(|m| m.get("-"))
            .cloned()
            .filter(|s| !s.is_empty())
    };
    let array = |n: &str| -> BTreeMap<usize, String> {
        recs.get(n)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.parse().ok()?, v.clone())))
                    .collect()
            })
            .unwrap_or_default()
    };
    let bad = |m: String| DkmsError::Conf {
        path: conf.to_path_buf(),
        message: m,
    };
    let name = scalar("PACKAGE_NAME").ok_or_else(|| bad("PACKAGE_NAME is not set".into()))?;
    let version =
        scalar("PACKAGE_VERSION").ok_or_else(|| bad("PACKAGE_VERSION is not set".into()))?;
    let make_all = array("MAKE");
    let matched = array("MAKE_MATCHED");
    // dkms: MAKE[0] unless a MAKE_MATCH[i] matches; the last match wins.
    let make = matched
        .keys()
        .rev()
        .find_map(|i| make_all.get(i))
        .or_else(|| make_all.get(&0))
        .cloned()
        .filter(|m| !m.trim().is_empty());
    let patch_all = array("PATCH");
    let applies = array("PATCH_APPLIES");
    let patches = patch_all
        .iter()
        .filter(|(i, _)| applies.contains_key(i))
        .map(|(_, p)| p.clone())
        .collect();
    let built = array("BUILT_MODULE_NAME");
    let loc = array("BUILT_MODULE_LOCATION");
    let dest = array("DEST_MODULE_NAME");
    let strip = array("STRIP");
    let strip0 = strip.get(&0).cloned();
    let mut modules = Vec::new();
    for (i, b) in &built {
        if b.is_empty() {
            continue;
        }
        let s = strip.get(i).cloned().or_else(|| strip0.clone());
        modules.push(ModuleSpec {
            built_name: b.clone(),
            built_location: loc.get(i).cloned().unwrap_or_default(),
            dest_name: dest
                .get(i)
                .filter(|d| !d.is_empty())
                .cloned()
                .unwrap_or_else(|| b.clone()),
            strip: !matches!(s.as_deref(), Some("no" | "No" | "NO" | "n" | "N")),
        });
    }
    if modules.is_empty() {
        return Err(bad("no BUILT_MODULE_NAME[] is set".into()));
    }
    for m in &modules {
        for part in [&m.built_name, &m.dest_name] {
            if part.contains('/') || part.contains("..") {
                return Err(bad(format!(
                    "module name {part:?} must be a plain file name"
                )));
            }
        }
        if m.built_location.split('/').any(|c| c == "..") || m.built_location.starts_with('/') {
            return Err(bad(format!(
                "BUILT_MODULE_LOCATION {:?} must stay in the build directory",
                m.built_location
            )));
        }
    }
    Ok(DkmsConf {
        name,
        version,
        pre_build: scalar("PRE_BUILD"),
        post_build: scalar("POST_BUILD"),
        make,
        patches,
        modules,
        excluded: scalar("EXCLUDED"),
        exclusive_min: scalar("BUILD_EXCLUSIVE_KERNEL_MIN"),
        exclusive_max: scalar("BUILD_EXCLUSIVE_KERNEL_MAX"),
        exclusive_config: scalar("BUILD_EXCLUSIVE_CONFIG"),
    })
}

/// Compare versions as `sort -V` (and dkms's `vercmp`) do, well enough for
/// kernel releases: runs of digits numerically, everything else bytewise.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let o = match (x, y) {
            ((true, x), (true, y)) => x
                .trim_start_matches('0')
                .len()
                .cmp(&y.trim_start_matches('0').len())
                .then_with(|| x.trim_start_matches('0').cmp(y.trim_start_matches('0'))),
            ((_, x), (_, y)) => x.cmp(y),
        };
        if o.is_ne() {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

impl DkmsConf {
    /// Why this kernel is skipped, if it is: BUILD_EXCLUSIVE_* against the
    /// kernel release and its `.config`.
    pub fn exclusion(&self, kver: &str, kconfig: &str) -> Option<String> {
        if let Some(e) = &self.excluded {
            return Some(e.clone());
        }
        if let Some(min) = &self.exclusive_min {
            if version_cmp(kver, min).is_lt() {
                return Some(format!(
                    "kernel {kver} is older than BUILD_EXCLUSIVE_KERNEL_MIN={min}"
                ));
            }
        }
        if let Some(max) = &self.exclusive_max {
            if version_cmp(kver, max).is_gt() {
                return Some(format!(
                    "kernel {kver} is newer than BUILD_EXCLUSIVE_KERNEL_MAX={max}"
                ));
            }
        }
        if let Some(cfg) = &self.exclusive_config {
            let set = |opt: &str| {
                kconfig
                    .lines()
                    .any(|l| l == format!("{opt}=y") || l == format!("{opt}=m"))
            };
            for want in cfg.split_whitespace() {
                let (neg, opt) = match want.strip_prefix('!') {
                    Some(o) => (true, o),
                    None => (false, want),
                };
                if set(opt) == neg {
                    return Some(format!(
                        "the kernel's .config does not satisfy BUILD_EXCLUSIVE_CONFIG ({want})"
                    ));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(items: &[(&str, &str, &str)]) -> Vec<u8> {
        let mut v = Vec::new();
        for (a, b, c) in items {
            for s in [a, b, c] {
                v.extend_from_slice(s.as_bytes());
                v.push(0);
            }
        }
        v
    }

    #[test]
    fn selection_rules() {
        let c = parse(
            &rec(&[
                ("PACKAGE_NAME", "-", "x"),
                ("PACKAGE_VERSION", "-", "1"),
                ("MAKE", "0", "make a"),
                ("MAKE", "1", "make b"),
                ("MAKE", "2", "make c"),
                ("MAKE_MATCHED", "1", "1"),
                ("MAKE_MATCHED", "2", "1"),
                ("PATCH", "0", "p0.patch"),
                ("PATCH", "1", "p1.patch"),
                ("PATCH_APPLIES", "1", "1"),
                ("BUILT_MODULE_NAME", "0", "m0"),
                ("BUILT_MODULE_NAME", "1", "m1"),
                ("DEST_MODULE_NAME", "1", "renamed"),
                ("BUILT_MODULE_LOCATION", "1", "src/"),
                ("STRIP", "0", "no"),
            ]),
            Path::new("dkms.conf"),
        )
        .unwrap();
        assert_eq!(c.make.as_deref(), Some("make c"));
        assert_eq!(c.patches, vec!["p1.patch"]);
        assert_eq!(c.modules[1].dest_name, "renamed");
        assert_eq!(c.modules[1].built_location, "src/");
        assert!(
            !c.modules[0].strip && !c.modules[1].strip,
            "STRIP[0] is the default"
        );
    }

    #[test]
    fn refusals() {
        let e = parse(&rec(&[("PACKAGE_NAME", "-", "x")]), Path::new("d")).unwrap_err();
        assert!(e.to_string().contains("PACKAGE_VERSION"));
        let e = parse(
            &rec(&[
                ("PACKAGE_NAME", "-", "x"),
                ("PACKAGE_VERSION", "-", "1"),
                ("BUILT_MODULE_NAME", "0", "m"),
                ("BUILT_MODULE_LOCATION", "0", "../../etc"),
            ]),
            Path::new("d"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("stay in the build directory"));
    }

    #[test]
    fn exclusive_checks() {
        let mut c = DkmsConf {
            exclusive_min: Some("6.2".into()),
            ..Default::default()
        };
        assert!(c.exclusion("6.1.0-9-amd64", "").unwrap().contains("older"));
        c.exclusive_min = Some("5.10".into());
        assert!(c.exclusion("6.1.0-9-amd64", "").is_none());
        c.exclusive_max = Some("6.0.99".into());
        assert!(c.exclusion("6.1.0-9-amd64", "").unwrap().contains("newer"));
        c.exclusive_max = None;
        c.exclusive_config = Some("CONFIG_ACPI !CONFIG_FOO".into());
        assert!(c.exclusion("6.1.0", "CONFIG_ACPI=y\n").is_none());
        assert!(c
            .exclusion("6.1.0", "CONFIG_ACPI=y\nCONFIG_FOO=m\n")
            .is_some());
        assert!(c.exclusion("6.1.0", "# CONFIG_ACPI is not set\n").is_some());
        assert!(version_cmp("6.10", "6.9").is_gt());
    }
}
