"""python train.py clothes=dress backbone=senet154  (see conf/train.yaml)"""

from fashionkp.commands import train_main as main

if __name__ == "__main__":
    main()
