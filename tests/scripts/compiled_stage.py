"""One rank of a stage under torchrun, then what dynamo compiled in it: rank 0 prints the stage's result and dynamo's
counters (graphs compiled, graph breaks by reason) as JSON lines."""
import json
import os
import sys
from pathlib import Path


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
    from torch._dynamo.utils import counters

    from pretrain.engine.trainer import run_stage

    result = run_stage(sys.argv[1], sys.argv[2:])
    if os.environ["RANK"] == "0":
        print("RESULT " + json.dumps(result))
        print("DYNAMO " + json.dumps({"unique_graphs": counters["stats"]["unique_graphs"],
                                      "graph_breaks": dict(counters["graph_break"])}))


if __name__ == "__main__":
    main()
