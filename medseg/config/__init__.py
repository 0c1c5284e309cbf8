"""Typed run configuration: YAML in, validated pydantic objects out, at one boundary.

:mod:`medseg.config.schema` holds what every task shares: the option enums, the sections every task
has (:class:`DataConfig`, :class:`PreprocessConfig`, augmentation, :class:`ModelConfig`,
:class:`OptimConfig`, :class:`TrainConfig`, :class:`TrackingConfig`, ...) and the base
:class:`RunConfig`. :mod:`medseg.config.loading` reads, overrides, validates and writes. Each task's
config class lives with the task (``medseg.tasks.<task>.config``): it subclasses :class:`RunConfig`,
fixes ``task`` to its name and narrows the sections to its own, so an option of another task is
refused by ``extra="forbid"`` and a section the task needs is a required field. Which class
validates a file is the task registry's business (:func:`medseg.tasks.registry.load_config`);
nothing here branches on the task.

Everything downstream sees attributes, never string keys. Unknown keys are errors that suggest
the nearest valid key ("did you mean"), the way MONAI's ``look_up_option`` does, or name the task
the key belongs to.
"""

from medseg.config.loading import (
    ConfigT as ConfigT,
)
from medseg.config.loading import (
    apply_override as apply_override,
)
from medseg.config.loading import (
    config_to_dict as config_to_dict,
)
from medseg.config.loading import (
    dump_config as dump_config,
)
from medseg.config.loading import (
    flatten as flatten,
)
from medseg.config.loading import (
    read_config_file as read_config_file,
)
from medseg.config.loading import (
    validate_config as validate_config,
)
from medseg.config.schema import (
    DATA_ROOT_ENV as DATA_ROOT_ENV,
)
from medseg.config.schema import (
    AffineAug as AffineAug,
)
from medseg.config.schema import (
    AugmentConfig as AugmentConfig,
)
from medseg.config.schema import (
    BiasFieldAug as BiasFieldAug,
)
from medseg.config.schema import (
    CacheMode as CacheMode,
)
from medseg.config.schema import (
    CalibratedValidationConfig as CalibratedValidationConfig,
)
from medseg.config.schema import (
    ContrastAug as ContrastAug,
)
from medseg.config.schema import (
    DataConfig as DataConfig,
)
from medseg.config.schema import (
    ElasticAug as ElasticAug,
)
from medseg.config.schema import (
    FlipAug as FlipAug,
)
from medseg.config.schema import (
    GammaAug as GammaAug,
)
from medseg.config.schema import (
    GibbsAug as GibbsAug,
)
from medseg.config.schema import (
    IntensityConfig as IntensityConfig,
)
from medseg.config.schema import (
    IntensityMode as IntensityMode,
)
from medseg.config.schema import (
    KSpaceSpikeAug as KSpaceSpikeAug,
)
from medseg.config.schema import (
    LabelledDataConfig as LabelledDataConfig,
)
from medseg.config.schema import (
    LossConfig as LossConfig,
)
from medseg.config.schema import (
    ModelConfig as ModelConfig,
)
from medseg.config.schema import (
    NoiseAug as NoiseAug,
)
from medseg.config.schema import (
    OptimConfig as OptimConfig,
)
from medseg.config.schema import (
    OptimizerName as OptimizerName,
)
from medseg.config.schema import (
    PatchConfig as PatchConfig,
)
from medseg.config.schema import (
    PatchSampler as PatchSampler,
)
from medseg.config.schema import (
    Precision as Precision,
)
from medseg.config.schema import (
    PreprocessConfig as PreprocessConfig,
)
from medseg.config.schema import (
    Rot90Aug as Rot90Aug,
)
from medseg.config.schema import (
    RunConfig as RunConfig,
)
from medseg.config.schema import (
    ScheduleName as ScheduleName,
)
from medseg.config.schema import (
    Section as Section,
)
from medseg.config.schema import (
    StrEnum as StrEnum,
)
from medseg.config.schema import (
    TrackingConfig as TrackingConfig,
)
from medseg.config.schema import (
    TrainConfig as TrainConfig,
)
from medseg.config.schema import (
    UNetModelConfig as UNetModelConfig,
)
from medseg.config.schema import (
    ValidationConfig as ValidationConfig,
)
from medseg.config.schema import (
    check_spatial_length as check_spatial_length,
)
