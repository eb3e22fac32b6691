"""Where a run trains: the tf.distribute strategy of ``trainer.strategy``.

| trainer.strategy | strategy                                 | replicas                                        |
|------------------|------------------------------------------|-------------------------------------------------|
| auto (default)   | TensorFlow's default strategy            | one device (a GPU if there is one, else the CPU) |
| mirrored         | ``MirroredStrategy`` on this machine     | every local GPU; without GPUs, every logical CPU |
| multi_worker     | ``MultiWorkerMirroredStrategy``          | every worker's local devices                    |

``multi_worker`` finds its cluster in ``TF_CONFIG`` (one JSON per process: the cluster's addresses and
this task's type and index), else in SLURM's environment (one task per node, e.g. ``srun
--ntasks-per-node=1 python train.py ...``), else trains as the only worker. ``trainer.batch_size`` is the
global batch, split between the replicas. The chief (task ``chief``, or ``worker`` 0 in a cluster without
one) logs the run; the other workers only take part in training (``is_chief``).

The strategy must be made before TensorFlow runs anything: ``MultiWorkerMirroredStrategy`` configures
the collective ops of the process, which TensorFlow refuses once its context exists.
"""

import os

import tensorflow as tf

SLURM_PORT = 8888  # the first port of a node's tasks under SLURM (SlurmClusterResolver's default)
SLURM_TASKS_PER_NODE_MAX = 1024  # see slurm_resolver


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The strategy ``trainer.strategy`` names (one of ``STRATEGIES``)."""
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(local_devices())
    if name == "multi_worker":
        fix_keras_multi_worker()
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster_resolver())
    return tf.distribute.get_strategy()


def steps_per_execution(configured: int) -> int:
    """``trainer.steps_per_execution`` on one device; 1 in a tf.distribute strategy's scope, where Keras
    3.15's loop of several steps per call fails (keras-team/keras#19246: "You must feed a value for
    placeholder tensor" on MirroredStrategy's first epoch)."""
    return configured if not tf.distribute.has_strategy() else 1


def local_devices() -> list[str]:
    """This machine's GPUs; without any, its logical CPU devices (one unless configured before
    TensorFlow starts, e.g. ``tf.config.set_logical_device_configuration`` in the tests)."""
    gpus = tf.config.list_logical_devices("GPU")
    return [device.name for device in gpus or tf.config.list_logical_devices("CPU")]


def cluster_resolver() -> tf.distribute.cluster_resolver.ClusterResolver:
    """TF_CONFIG's cluster; else, inside a SLURM job step, SLURM's; else this process alone."""
    if "TF_CONFIG" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_STEP_NODELIST" in os.environ:
        return slurm_resolver()
    return tf.distribute.cluster_resolver.TFConfigClusterResolver()


def slurm_resolver() -> tf.distribute.cluster_resolver.SlurmClusterResolver:
    """The job step's tasks as workers, ``host:SLURM_PORT + i`` for the i-th task of a node.

    The resolver would also split each node's GPUs between its tasks through CUDA_VISIBLE_DEVICES, which
    is read once, when TensorFlow starts (before this): that split is off, and its GPU count only numbers
    the tasks (it must be >= the tasks per node, and it needs nvidia-smi when not given). Each task uses
    the GPUs it sees, so run one task per node."""
    return tf.distribute.cluster_resolver.SlurmClusterResolver(
        port_base=SLURM_PORT, gpus_per_node=SLURM_TASKS_PER_NODE_MAX, gpus_per_task=1, auto_set_gpu=False)


def task(strategy: tf.distribute.Strategy) -> tuple[str | None, int | None, dict]:
    """This process's task type and index and the cluster's jobs ({job: [addresses]}); (None, None,
    {}) outside a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().jobs:
        return None, None, {}
    return resolver.task_type, resolver.task_id, resolver.cluster_spec().as_dict()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process logs the run: always outside a cluster; in one, the ``chief`` task, or
    ``worker`` 0 when the cluster has no chief."""
    task_type, task_id, jobs = task(strategy)
    if task_type is None:
        return True
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in jobs)


def workers(strategy: tf.distribute.Strategy) -> int:
    """The processes that train together (1 outside a cluster)."""
    _, _, jobs = task(strategy)
    return sum(len(addresses) for job, addresses in jobs.items() if job in ("chief", "worker")) or 1


def tags(strategy: tf.distribute.Strategy) -> dict[str, str]:
    """The run's tags saying on how much it trained: ``replicas`` (all workers together) and ``workers``
    (the param ``trainer.strategy`` says which strategy)."""
    return {"replicas": str(strategy.num_replicas_in_sync), "workers": str(workers(strategy))}


def describe(strategy: tf.distribute.Strategy) -> str:
    """For the console: '' for one replica, else e.g. ' × 2 replicas on 1 worker'."""
    replicas, count = strategy.num_replicas_in_sync, workers(strategy)
    if replicas == 1 and count == 1:
        return ""
    return f" × {replicas} replicas on {count} worker{'s' * (count != 1)}"


def task_name(strategy: tf.distribute.Strategy) -> str:
    """``worker 1`` (for a non-chief worker's console lines)."""
    task_type, task_id, _ = task(strategy)
    return f"{task_type} {task_id}"


def fix_keras_multi_worker() -> None:
    """Two fixes to Keras 3.15's ``fit`` under ``MultiWorkerMirroredStrategy``, which it fails with
    several workers (keras-team/keras#20585, tensorflow/tensorflow#72388), patched into its TensorFlow
    trainer (the project pins Keras; tests/test_distribute.py runs a 2-worker fit):

    1. Before the first step, Keras builds its metrics from one input batch that it averages over all
       replicas with ``strategy.reduce`` on the whole (x, y) structure, which the multi-worker reduce
       refuses ("Attempt to convert a value (PerReplica...)"): this replica's own batch has the shapes
       it needs.
    2. Each step's logs (scalars) are averaged over the workers with ``axis=0``, which scalars do not
       have ("Invalid reduction dimension 0"): they are averaged as they are.
    """
    from keras.src.backend.tensorflow import trainer as keras_trainer

    if getattr(keras_trainer, "multi_worker_fixed", False):
        return
    reduce_per_replica = keras_trainer.reduce_per_replica

    def reduce_scalars_too(values, strategy, reduction):
        if reduction in ("auto", "mean") and keras_trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None) if isinstance(v, tf.distribute.DistributedValues)
                else v, values)
        return reduce_per_replica(values, strategy, reduction)

    def symbolic_build_from_local_batch(model, iterator=None, data_batch=None):
        strategy = model.distribute_strategy
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0],
                                                   next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    maybe_symbolic_build = keras_trainer.TensorFlowTrainer._maybe_symbolic_build

    def maybe_symbolic_build_multi_worker(model, iterator=None, data_batch=None):
        if keras_trainer._collective_all_reduce_multi_worker(model.distribute_strategy):
            return symbolic_build_from_local_batch(model, iterator, data_batch)
        return maybe_symbolic_build(model, iterator, data_batch)

    keras_trainer.reduce_per_replica = reduce_scalars_too
    keras_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build_multi_worker
    keras_trainer.multi_worker_fixed = True
