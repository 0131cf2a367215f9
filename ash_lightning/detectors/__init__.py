"""OOD detectors beyond logit scores: feature-space (mds, rmds, knn, vim, fdbd, nnguide, gradnorm, she, klm,
residual, nci, neco, mdspp, cadref, caref) and input-space (odin, adascale) baselines, as pure tensor functions
plus their fitting. See ``base`` for the contract and ``spec`` for the spec strings."""

from ash_lightning.detectors.adascale import AdaScale
from ash_lightning.detectors.base import Detector, FeatureDetector, FittedDetector
from ash_lightning.detectors.cadref import CADRef
from ash_lightning.detectors.caref import CARef
from ash_lightning.detectors.fdbd import FDBD
from ash_lightning.detectors.forward import FeaturesAndLogits
from ash_lightning.detectors.gradnorm import GradNorm, gradnorm
from ash_lightning.detectors.klm import KLM
from ash_lightning.detectors.knn import KNN, NNGuide
from ash_lightning.detectors.mahalanobis import MDS, RMDS
from ash_lightning.detectors.mdspp import MDSPP
from ash_lightning.detectors.nci import NCI
from ash_lightning.detectors.neco import NECO
from ash_lightning.detectors.odin import ODIN, odin
from ash_lightning.detectors.residual import Residual
from ash_lightning.detectors.she import SHE
from ash_lightning.detectors.spec import DETECTORS, is_detector_spec, load_fitted, parse_detector, valid_forms
from ash_lightning.detectors.vim import ViM

__all__ = [
    "DETECTORS",
    "FDBD",
    "KLM",
    "KNN",
    "MDS",
    "MDSPP",
    "NCI",
    "NECO",
    "ODIN",
    "RMDS",
    "SHE",
    "AdaScale",
    "CADRef",
    "CARef",
    "Detector",
    "FeatureDetector",
    "FeaturesAndLogits",
    "FittedDetector",
    "GradNorm",
    "NNGuide",
    "Residual",
    "ViM",
    "gradnorm",
    "is_detector_spec",
    "load_fitted",
    "odin",
    "parse_detector",
    "valid_forms",
]
