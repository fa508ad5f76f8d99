//! The simulator's state and the generic Create/Get/List/Delete/Update logic shared by the four
//! resource kinds ([`Kind`]); the per-kind rules live in [`super::kinds`].
//!
//! Status is derived from time, as in the reference server where each component (`frr`, `linux`,
//! `vendor`) reports back asynchronously: an object created or changed at `since` is DOWN with
//! every component PENDING until `since + up_delay`, then UP with every component SUCCESS. A
//! deleted object is TO_BE_DELETED (components PENDING again) until `since + delete_delay`, then
//! gone. Transitions are applied lazily, at the start of every operation, so no background task is
//! needed and the behaviour is the same for every observer.

use std::{
    collections::BTreeMap,
    ops::Bound,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tonic::Status;
use tracing::{debug, info};
use xpu_proto::opi::evpn_gw as gw;

use super::validate::{decode_token, encode_token, generate_id, missing, not_found, snake_case, validate_user_id};

/// Every name the server returns starts with this, followed by `<collection>/<id>`.
pub const NAME_PREFIX: &str = "//network.opiproject.org/";

const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Life {
    /// Created or changed; the components have not all reported yet.
    Pending,
    Up,
    Deleting,
}

/// The oper status values, the same numbers in all four `*OperStatus` enums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Oper {
    Up,
    Down,
    ToBeDeleted,
}

#[derive(Clone, Debug)]
pub(crate) struct Entry<S> {
    pub spec: S,
    pub life: Life,
    pub since: Instant,
}

/// A component failure injected by a test: the component reports ERROR with `details`, so objects
/// of the kinds that have this component stay DOWN.
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    pub component: String,
    pub details: String,
}

#[derive(Default)]
pub(crate) struct State {
    pub vrfs: BTreeMap<String, Entry<gw::VrfSpec>>,
    pub bridges: BTreeMap<String, Entry<gw::LogicalBridgeSpec>>,
    pub ports: BTreeMap<String, Entry<gw::BridgePortSpec>>,
    pub svis: BTreeMap<String, Entry<gw::SviSpec>>,
    /// Count of changes accepted (create, changing update, delete).
    pub writes: u64,
    pub failure: Option<Failure>,
}

/// One resource kind of the EVPN gateway API.
pub(crate) trait Kind: 'static {
    type Spec: Clone + PartialEq + Default + std::fmt::Debug;
    type Msg;
    /// Path segment in names: `bridges`, `ports`, `vrfs`, `svis`.
    const COLLECTION: &'static str;
    /// The request field holding the object (`logical_bridge`), for error messages.
    const FIELD: &'static str;
    /// The create request's id field (`logical_bridge_id`).
    const ID_FIELD: &'static str;
    /// Human name for messages ("logical bridge").
    const NOUN: &'static str;
    /// The components that report on this kind.
    const COMPONENTS: &'static [&'static str];

    fn table(s: &State) -> &BTreeMap<String, Entry<Self::Spec>>;
    fn table_mut(s: &mut State) -> &mut BTreeMap<String, Entry<Self::Spec>>;
    fn into_parts(msg: Self::Msg) -> (String, Option<Self::Spec>);
    fn from_parts(name: String, spec: Self::Spec, oper: Oper, components: Vec<gw::Component>) -> Self::Msg;
    /// The first REQUIRED spec field (field_behavior) that is unset, as a path below `spec`.
    fn first_missing(spec: &Self::Spec) -> Option<&'static str>;
    /// Value ranges, references and uniqueness; `name` is the object being written (excluded from
    /// uniqueness checks).
    fn validate(state: &State, name: &str, spec: &Self::Spec) -> Result<(), Status>;
    /// Copies one spec field (update_mask path below `spec.`); false if there is no such field.
    fn copy_field(dst: &mut Self::Spec, src: &Self::Spec, field: &str) -> bool;
    /// Objects that refer to `name` and so keep it from being deleted.
    fn referrers(_state: &State, _name: &str) -> Vec<String> {
        Vec::new()
    }
}

pub(crate) struct Store {
    state: Mutex<State>,
    up_delay: Duration,
    delete_delay: Duration,
    /// Create, Update and Delete requests received, whatever their outcome.
    change_requests: AtomicU64,
}

impl Store {
    pub(crate) fn new(up_delay: Duration, delete_delay: Duration) -> Store {
        Store { state: Mutex::new(State::default()), up_delay, delete_delay, change_requests: AtomicU64::new(0) }
    }

    pub(crate) fn change_requests(&self) -> u64 {
        self.change_requests.load(Ordering::Relaxed)
    }

    fn count_change_request(&self) {
        self.change_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Locks the state and applies every transition due by `now`.
    pub(crate) fn lock(&self, now: Instant) -> MutexGuard<'_, State> {
        let mut st = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let failure = st.failure.clone();
        settle::<super::kinds::VrfKind>(&mut st, now, self.up_delay, self.delete_delay, failure.as_ref());
        settle::<super::kinds::BridgeKind>(&mut st, now, self.up_delay, self.delete_delay, failure.as_ref());
        settle::<super::kinds::PortKind>(&mut st, now, self.up_delay, self.delete_delay, failure.as_ref());
        settle::<super::kinds::SviKind>(&mut st, now, self.up_delay, self.delete_delay, failure.as_ref());
        st
    }

    fn render<K: Kind>(&self, st: &State, name: &str, e: &Entry<K::Spec>, now: Instant) -> K::Msg {
        let done = now.saturating_duration_since(e.since) >= self.up_delay;
        let failing = failure_for::<K>(st.failure.as_ref());
        let comp = |name: &str, status: gw::CompStatus, details: &str| gw::Component {
            name: name.to_string(),
            status: status as i32,
            details: details.to_string(),
        };
        let (oper, components) = match e.life {
            Life::Up => (Oper::Up, K::COMPONENTS.iter().map(|c| comp(c, gw::CompStatus::Success, "")).collect()),
            Life::Deleting => {
                (Oper::ToBeDeleted, K::COMPONENTS.iter().map(|c| comp(c, gw::CompStatus::Pending, "")).collect())
            }
            Life::Pending => {
                let comps = K::COMPONENTS
                    .iter()
                    .map(|c| match failing {
                        Some(f) if done && f.component == *c => comp(c, gw::CompStatus::Error, &f.details),
                        Some(_) if done => comp(c, gw::CompStatus::Success, ""),
                        _ => comp(c, gw::CompStatus::Pending, ""),
                    })
                    .collect();
                (Oper::Down, comps)
            }
        };
        K::from_parts(name.to_string(), e.spec.clone(), oper, components)
    }

    fn render_name<K: Kind>(&self, st: &State, name: &str, now: Instant) -> Result<K::Msg, Status> {
        let e = K::table(st).get(name).ok_or_else(|| not_found(name))?;
        Ok(self.render::<K>(st, name, e, now))
    }

    pub(crate) fn create<K: Kind>(&self, id: &str, msg: Option<K::Msg>) -> Result<K::Msg, Status> {
        self.count_change_request();
        let (_, spec) = K::into_parts(msg.ok_or_else(|| missing(K::FIELD))?);
        let spec = required_spec::<K>(spec)?;
        let id = if id.is_empty() {
            generate_id()
        } else {
            validate_user_id(K::ID_FIELD, id)?;
            id.to_string()
        };
        let name = format!("{NAME_PREFIX}{}/{id}", K::COLLECTION);
        let now = Instant::now();
        let mut st = self.lock(now);
        if let Some(e) = K::table(&st).get(&name) {
            // Idempotent: the stored object, whatever spec was sent this time.
            debug!(%name, "create: already exists, returning the stored object");
            return Ok(self.render::<K>(&st, &name, e, now));
        }
        K::validate(&st, &name, &spec)?;
        K::table_mut(&mut st).insert(name.clone(), Entry { spec, life: Life::Pending, since: now });
        st.writes += 1;
        info!(%name, "created {}", K::NOUN);
        self.render_name::<K>(&st, &name, now)
    }

    pub(crate) fn get<K: Kind>(&self, name: &str) -> Result<K::Msg, Status> {
        if name.is_empty() {
            return Err(missing("name"));
        }
        let now = Instant::now();
        let st = self.lock(now);
        self.render_name::<K>(&st, name, now)
    }

    pub(crate) fn list<K: Kind>(&self, page_size: i32, page_token: &str) -> Result<(Vec<K::Msg>, String), Status> {
        let size = match usize::try_from(page_size) {
            Err(_) => return Err(Status::invalid_argument(format!("page_size must not be negative, got {page_size}"))),
            Ok(0) => DEFAULT_PAGE_SIZE,
            Ok(n) => n.min(MAX_PAGE_SIZE),
        };
        let after = if page_token.is_empty() { None } else { Some(decode_token(page_token)?) };
        let now = Instant::now();
        let st = self.lock(now);
        let lower = match &after {
            Some(a) => Bound::Excluded(a.clone()),
            None => Bound::Unbounded,
        };
        let mut items: Vec<(String, K::Msg)> = Vec::new();
        let mut next = String::new();
        for (name, e) in K::table(&st).range::<String, _>((lower, Bound::Unbounded)) {
            if items.len() == size {
                // There is more: the next page continues after the last object returned.
                if let Some((last, _)) = items.last() {
                    next = encode_token(last);
                }
                break;
            }
            items.push((name.clone(), self.render::<K>(&st, name, e, now)));
        }
        Ok((items.into_iter().map(|(_, m)| m).collect(), next))
    }

    pub(crate) fn delete<K: Kind>(&self, name: &str, allow_missing: bool) -> Result<(), Status> {
        self.count_change_request();
        if name.is_empty() {
            return Err(missing("name"));
        }
        let now = Instant::now();
        let mut st = self.lock(now);
        let Some(life) = K::table(&st).get(name).map(|e| e.life) else {
            return if allow_missing { Ok(()) } else { Err(not_found(name)) };
        };
        if life == Life::Deleting {
            return Ok(());
        }
        let referrers = K::referrers(&st, name);
        if !referrers.is_empty() {
            return Err(Status::failed_precondition(format!(
                "{} {name} cannot be deleted: it is still referenced by {}",
                K::NOUN,
                referrers.join(", ")
            )));
        }
        if self.delete_delay.is_zero() {
            K::table_mut(&mut st).remove(name);
        } else if let Some(e) = K::table_mut(&mut st).get_mut(name) {
            e.life = Life::Deleting;
            e.since = now;
        }
        st.writes += 1;
        info!(%name, "deleting {}", K::NOUN);
        Ok(())
    }

    pub(crate) fn update<K: Kind>(
        &self,
        msg: Option<K::Msg>,
        mask: Option<prost_types::FieldMask>,
        allow_missing: bool,
    ) -> Result<K::Msg, Status> {
        self.count_change_request();
        let (name, spec_in) = K::into_parts(msg.ok_or_else(|| missing(K::FIELD))?);
        if name.is_empty() {
            return Err(missing(&format!("{}.name", K::FIELD)));
        }
        let now = Instant::now();
        let mut st = self.lock(now);
        let current = K::table(&st).get(&name).map(|e| (e.spec.clone(), e.life));
        let Some((old, life)) = current else {
            if !allow_missing {
                return Err(not_found(&name));
            }
            // allow_missing: create the object under the given name; the mask does not apply.
            let prefix = format!("{NAME_PREFIX}{}/", K::COLLECTION);
            let id = name.strip_prefix(&prefix).ok_or_else(|| {
                Status::invalid_argument(format!("{}.name {name:?} is not of the form {prefix}<id>", K::FIELD))
            })?;
            validate_user_id(&format!("{}.name", K::FIELD), id)?;
            let spec = required_spec::<K>(spec_in)?;
            K::validate(&st, &name, &spec)?;
            K::table_mut(&mut st).insert(name.clone(), Entry { spec, life: Life::Pending, since: now });
            st.writes += 1;
            info!(%name, "created {} (update with allow_missing)", K::NOUN);
            return self.render_name::<K>(&st, &name, now);
        };
        if life == Life::Deleting {
            return Err(Status::failed_precondition(format!(
                "{} {name} is in TO_BE_DELETED state and cannot be updated",
                K::NOUN
            )));
        }
        let new = masked::<K>(&old, spec_in, mask)?;
        if let Some(path) = K::first_missing(&new) {
            return Err(missing(&format!("{}.spec.{path}", K::FIELD)));
        }
        if new == old {
            debug!(%name, "update: no change");
            return self.render_name::<K>(&st, &name, now);
        }
        K::validate(&st, &name, &new)?;
        if let Some(e) = K::table_mut(&mut st).get_mut(&name) {
            e.spec = new;
            e.life = Life::Pending;
            e.since = now;
        }
        st.writes += 1;
        info!(%name, "updated {}", K::NOUN);
        self.render_name::<K>(&st, &name, now)
    }

    pub(crate) fn set_failure(&self, failure: Option<Failure>) {
        self.lock(Instant::now()).failure = failure;
    }
}

fn required_spec<K: Kind>(spec: Option<K::Spec>) -> Result<K::Spec, Status> {
    let spec = spec.ok_or_else(|| missing(&format!("{}.spec", K::FIELD)))?;
    if let Some(path) = K::first_missing(&spec) {
        return Err(missing(&format!("{}.spec.{path}", K::FIELD)));
    }
    Ok(spec)
}

/// Applies an update mask with AIP-134 semantics: no paths (or `*`) replace the whole spec; `spec`
/// replaces it too; `spec.<field>` copies one field.
fn masked<K: Kind>(
    old: &K::Spec,
    new: Option<K::Spec>,
    mask: Option<prost_types::FieldMask>,
) -> Result<K::Spec, Status> {
    let paths: Vec<String> = mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() || paths.iter().any(|p| p == "*") {
        return new.ok_or_else(|| missing(&format!("{}.spec", K::FIELD)));
    }
    let src = new.unwrap_or_default();
    let mut out = old.clone();
    for path in &paths {
        let p = snake_case(path);
        if p == "spec" {
            out = src.clone();
            continue;
        }
        let ok = p.strip_prefix("spec.").is_some_and(|field| K::copy_field(&mut out, &src, field));
        if !ok {
            return Err(Status::invalid_argument(format!(
                "update_mask path {path:?} is not an updatable field of the {} (use \"spec\" or \"spec.<field>\")",
                K::NOUN
            )));
        }
    }
    Ok(out)
}

fn failure_for<K: Kind>(failure: Option<&Failure>) -> Option<&Failure> {
    failure.filter(|f| K::COMPONENTS.contains(&f.component.as_str()))
}

fn settle<K: Kind>(
    st: &mut State,
    now: Instant,
    up_delay: Duration,
    delete_delay: Duration,
    failure: Option<&Failure>,
) {
    let blocked = failure_for::<K>(failure).is_some();
    let table = K::table_mut(st);
    table.retain(|_, e| !(e.life == Life::Deleting && now.saturating_duration_since(e.since) >= delete_delay));
    for e in table.values_mut() {
        if e.life == Life::Pending && !blocked && now.saturating_duration_since(e.since) >= up_delay {
            e.life = Life::Up;
        }
    }
}
