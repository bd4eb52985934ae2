"""python evaluate.py checkpoints=[model.ckpt] data.root=<split>  (see conf/evaluate.yaml)"""

from fashionkp.commands import evaluate_main as main

if __name__ == "__main__":
    main()
