"""python train.py clothes=dress backbone=senet154  (see conf/train.yaml)"""

from fashionkp.training.train import main

if __name__ == "__main__":
    main()
