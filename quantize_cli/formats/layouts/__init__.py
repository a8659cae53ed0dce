"""The layouts, one module per kind of element: integer codes (integers.py), FP8 with
float scales (fp8.py), and the microscaling types NVFP4, MXFP4 and MXFP8
(microscaling.py). Each module holds the layout of every model format that stores its
kind; the model formats list the layouts they hold."""
