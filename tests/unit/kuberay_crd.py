"""What KubeRay's ``ray.io/v1`` CRDs accept, at the object paths that deploy/*.yaml uses.

Pinned to KubeRay **v1.7.0**, the newest v1.x release tag of ray-project/kuberay when this was
written. The facts were read from that tag's CRDs (ray-operator/config/crd/bases/ and the identical
copies in helm-chart/kuberay-operator/crds/): ``ray.io_rayjobs.yaml``, ``ray.io_rayservices.yaml``
and ``ray.io_rayclusters.yaml``, the ``v1`` version of each. A few rules that the CRDs do not carry
but the operator enforces come from ray-operator/apis/ray/v1/rayjob_types.go and
ray-operator/controllers/ray/utils/validation.go; they are marked "operator" below.

Paths are dotted from the document root (``""``); ``[]`` steps into the items of a list, so
``spec.rayClusterSpec.workerGroupSpecs[]`` is one worker group. Each path maps to an :class:`Obj`:
the property names allowed there with the kind of value each takes, the required ones, and any
enum or lower bound. Paths not listed here (``deletionStrategy``, probes, affinity, …) are not
descended into; their value kind is still checked from the parent.

A Kubernetes API server refuses an object that lacks a required property or breaks an enum, type or
bound. An unknown property is refused by ``kubectl apply`` (its default, strict, field validation)
and otherwise silently dropped, which for a misspelt section such as
``rayClusterSpec`` in a RayService means the whole cluster definition disappears.

Under Pod templates the list is focused: every property name of PodSpec and Container is allowed
(an unknown one is flagged), but only the fields our manifests set carry a value kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KUBERAY_VERSION = "v1.7.0"
API_VERSION = "ray.io/v1"
KINDS = ("RayJob", "RayService", "RayCluster")

# Kinds of value.
STR, INT, NUM, BOOL, OBJ, LIST = "string", "integer", "number", "boolean", "object", "list"
STR_MAP = "string map"  # an object whose values are all strings: labels, nodeSelector, rayStartParams
QTY = "quantity"  # an integer or a quantity string ("8", "64Gi", "500m"); a float is refused
QTY_MAP = "quantity map"  # resources.limits / requests
ANY = "any"  # an allowed name whose value kind is not checked here


@dataclass(frozen=True)
class Obj:
    """One object in a manifest: allowed properties → value kind, plus required names, enums, bounds."""

    props: dict[str, str]
    required: tuple[str, ...] = ()
    enums: dict[str, tuple[str, ...]] = field(default_factory=dict)
    minimum: dict[str, int] = field(default_factory=dict)


def _names(words: str) -> dict[str, str]:
    """Allowed names whose value kind is left unchecked."""
    return dict.fromkeys(words.split(), ANY)


# Not in the CRDs: metadata is the API server's ObjectMeta.
_OBJECT_META = Obj({
    **_names("generateName selfLink uid resourceVersion generation creationTimestamp deletionTimestamp "
             "deletionGracePeriodSeconds ownerReferences managedFields"),
    "name": STR, "namespace": STR, "labels": STR_MAP, "annotations": STR_MAP, "finalizers": LIST,
})

_ROOT = Obj({"apiVersion": STR, "kind": STR, "metadata": OBJ, "spec": OBJ, "status": OBJ})

# Pod template: identical under the head group and every worker group.
_POD_TEMPLATE = {
    "": Obj({"metadata": OBJ, "spec": OBJ}),
    # The CRDs narrow the template's metadata to these five.
    ".metadata": Obj({"annotations": STR_MAP, "finalizers": LIST, "labels": STR_MAP, "name": STR, "namespace": STR}),
    ".spec": Obj({
        **_names("activeDeadlineSeconds affinity automountServiceAccountToken dnsConfig dnsPolicy "
                 "enableServiceLinks ephemeralContainers hostAliases hostIPC hostNetwork hostPID hostUsers "
                 "hostname hostnameOverride imagePullSecrets initContainers nodeName os overhead "
                 "preemptionPolicy priority priorityClassName readinessGates resourceClaims resources "
                 "restartPolicy runtimeClassName schedulerName schedulingGates schedulingGroup "
                 "securityContext serviceAccount setHostnameAsFQDN shareProcessNamespace subdomain "
                 "terminationGracePeriodSeconds topologySpreadConstraints"),
        "containers": LIST, "nodeSelector": STR_MAP, "serviceAccountName": STR, "tolerations": LIST,
        "volumes": LIST,
    }, required=("containers",)),
    ".spec.containers[]": Obj({
        **_names("envFrom imagePullPolicy lifecycle livenessProbe readinessProbe resizePolicy restartPolicy "
                 "restartPolicyRules securityContext startupProbe stdin stdinOnce terminationMessagePath "
                 "terminationMessagePolicy tty volumeDevices"),
        "name": STR, "image": STR, "command": LIST, "args": LIST, "workingDir": STR, "env": LIST,
        "ports": LIST, "resources": OBJ, "volumeMounts": LIST,
    }, required=("name",)),
    ".spec.containers[].resources": Obj({"claims": LIST, "limits": QTY_MAP, "requests": QTY_MAP}),
    ".spec.containers[].env[]": Obj({"name": STR, "value": STR, "valueFrom": OBJ}, required=("name",)),
    ".spec.containers[].env[].valueFrom": Obj({
        "configMapKeyRef": OBJ, "fieldRef": OBJ, "fileKeyRef": OBJ, "resourceFieldRef": OBJ, "secretKeyRef": OBJ,
    }),
    ".spec.containers[].env[].valueFrom.secretKeyRef": Obj({"key": STR, "name": STR, "optional": BOOL},
                                                         required=("key",)),
    ".spec.containers[].ports[]": Obj({"containerPort": INT, "hostIP": STR, "hostPort": INT, "name": STR,
                                       "protocol": STR}, required=("containerPort",)),
    ".spec.containers[].volumeMounts[]": Obj({
        "mountPath": STR, "mountPropagation": STR, "name": STR, "readOnly": BOOL, "recursiveReadOnly": STR,
        "subPath": STR, "subPathExpr": STR,
    }, required=("mountPath", "name")),
    ".spec.tolerations[]": Obj({"effect": STR, "key": STR, "operator": STR, "tolerationSeconds": INT,
                                "value": STR}),
    ".spec.volumes[]": Obj({
        **_names("awsElasticBlockStore azureDisk azureFile cephfs cinder configMap csi downwardAPI ephemeral fc "
                 "flexVolume flocker gcePersistentDisk gitRepo glusterfs hostPath image iscsi nfs "
                 "persistentVolumeClaim photonPersistentDisk portworxVolume projected quobyte rbd scaleIO "
                 "storageos vsphereVolume"),
        "name": STR, "emptyDir": OBJ, "secret": OBJ,
    }, required=("name",)),
    ".spec.volumes[].emptyDir": Obj({"medium": STR, "sizeLimit": QTY}),
    # core/v1 SecretVolumeSource and KeyToPath, embedded in the CRDs' pod template.
    ".spec.volumes[].secret": Obj({"defaultMode": INT, "items": LIST, "optional": BOOL, "secretName": STR}),
    ".spec.volumes[].secret.items[]": Obj({"key": STR, "mode": INT, "path": STR}, required=("key", "path")),
}

# RayClusterSpec: the same schema as RayJob's spec.rayClusterSpec, RayService's spec.rayClusterConfig
# and RayCluster's spec.
_CLUSTER = {
    "": Obj({
        "authOptions": OBJ, "autoscalerOptions": OBJ, "enableInTreeAutoscaling": BOOL,
        "gcsFaultToleranceOptions": OBJ, "headGroupSpec": OBJ, "headServiceAnnotations": STR_MAP,
        "historyServerOptions": OBJ, "managedBy": STR, "networkPolicy": OBJ, "rayVersion": STR, "suspend": BOOL,
        "tlsOptions": OBJ, "upgradeStrategy": OBJ, "workerGroupSpecs": LIST,
    }, required=("headGroupSpec",)),
    ".autoscalerOptions": Obj({
        "args": LIST, "command": LIST, "env": LIST, "envFrom": LIST, "idleTimeoutSeconds": INT, "image": STR,
        "imagePullPolicy": STR, "resources": OBJ, "securityContext": OBJ, "upscalingMode": STR, "version": STR,
        "volumeMounts": LIST,
    }, enums={"upscalingMode": ("Default", "Aggressive", "Conservative"), "version": ("v1", "v2")},
        minimum={"idleTimeoutSeconds": 0}),  # the bound: operator
    # rayStartParams is optional in v1.7.0 (older releases required it); values must be strings.
    ".headGroupSpec": Obj({
        "enableIngress": BOOL, "headService": OBJ, "ingressOptions": OBJ, "labels": STR_MAP,
        "rayStartParams": STR_MAP, "resources": STR_MAP, "serviceType": STR, "template": OBJ,
    }, required=("template",)),
    ".workerGroupSpecs[]": Obj({
        "groupName": STR, "idleTimeoutSeconds": INT, "labels": STR_MAP, "maxReplicas": INT, "minReplicas": INT,
        "numOfHosts": INT, "priority": INT, "rayStartParams": STR_MAP, "replicas": INT, "resources": STR_MAP,
        "scaleStrategy": OBJ, "suspend": BOOL, "template": OBJ,
    }, required=("groupName", "maxReplicas", "minReplicas", "template"),
        minimum={"minReplicas": 0, "maxReplicas": 0}),  # the bounds: operator
    **{".headGroupSpec.template" + k: v for k, v in _POD_TEMPLATE.items()},
    **{".workerGroupSpecs[].template" + k: v for k, v in _POD_TEMPLATE.items()},
}


def _under(prefix: str, part: dict[str, Obj]) -> dict[str, Obj]:
    return {(prefix + k).lstrip("."): v for k, v in part.items()}


# Where each kind keeps its cluster definition.
CLUSTER_PATH = {"RayJob": "spec.rayClusterSpec", "RayService": "spec.rayClusterConfig", "RayCluster": "spec"}

SCHEMA: dict[str, dict[str, Obj]] = {
    "RayJob": {
        "": _ROOT,
        "metadata": _OBJECT_META,
        "spec": Obj({
            "activeDeadlineSeconds": INT, "backoffLimit": INT, "clusterSelector": STR_MAP, "deletionStrategy": OBJ,
            "entrypoint": STR, "entrypointNumCpus": NUM, "entrypointNumGpus": NUM, "entrypointResources": STR,
            "jobId": STR, "managedBy": STR, "metadata": STR_MAP, "preRunningDeadlineSeconds": INT,
            "rayClusterSpec": OBJ, "runtimeEnvYAML": STR, "shutdownAfterJobFinishes": BOOL, "submissionMode": STR,
            "submitterConfig": OBJ, "submitterPodTemplate": OBJ, "suspend": BOOL, "ttlSecondsAfterFinished": INT,
        },
            # The CRD gives submissionMode no enum (default K8sJobMode); these are the JobSubmissionMode
            # constants the operator acts on.
            enums={"submissionMode": ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")},
            # preRunningDeadlineSeconds ≥ 1: CRD; the rest: operator.
            minimum={"preRunningDeadlineSeconds": 1, "activeDeadlineSeconds": 1, "backoffLimit": 0,
                     "ttlSecondsAfterFinished": 0}),
        **_under("spec.rayClusterSpec", _CLUSTER),
    },
    "RayService": {
        "": _ROOT,
        "metadata": _OBJECT_META,
        "spec": Obj({
            "deploymentUnhealthySecondThreshold": INT, "excludeHeadPodFromServeSvc": BOOL, "managedBy": STR,
            "rayClusterConfig": OBJ, "rayClusterDeletionDelaySeconds": INT, "serveConfigV2": STR,
            "serveService": OBJ, "serviceUnhealthySecondThreshold": INT, "suspend": BOOL, "upgradeStrategy": OBJ,
        }, required=("rayClusterConfig",), minimum={"rayClusterDeletionDelaySeconds": 0}),
        **_under("spec.rayClusterConfig", _CLUSTER),
    },
    "RayCluster": {
        "": _ROOT,
        "metadata": _OBJECT_META,
        **_under("spec", _CLUSTER),
    },
}

# Operator: metadata.name must be a DNS-1035 label of at most this many characters.
NAME_MAX = {"RayJob": 47, "RayService": 47, "RayCluster": 53}
