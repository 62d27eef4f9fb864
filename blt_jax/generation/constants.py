"""Plain values that the generation code and the command line share, in a module that imports nothing: the
command line shows them (`blt --help`, its defaults and limits) without loading JAX."""

# the defaults of SamplingConfig, UnmaskConfig and MethodConfig, `api.generate`'s and the command line's
TEMPERATURE = 0.0  # 0: greedy
TOP_K = 0  # 0: off
TOP_P = 1.0  # 1: off
UNMASK_RULE = "confidence"
ALPHA = 0.7  # confidence rule: commit cells with p > alpha
GAMMA = 1.0  # entropy rule: cumulative entropy bound
DRAFT_LEN = 8  # BLT-S: bytes drafted per round
SEED = 0

# a prompt and its generation are padded to one of these lengths: powers of two and 1.5x steps between them, so
# at most a third of a buffer is ever padding
LENGTH_BUCKETS = (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384,
                  24576, 32768, 49152, 65536)
# the longest window `blt eval --task bpb` scores (generation's position limit too)
MAX_WINDOW = LENGTH_BUCKETS[-1]
