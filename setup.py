"""dmore-nova: out-of-band VNC consoles that survive live migration (a Nova extension)."""

from setuptools import find_packages, setup

setup(
    name="dmore-nova",
    version="0.1.0",
    description="Migratable out-of-band VNC consoles for Xen guests under OpenStack Nova",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["dmore_nova", "dmore_nova.*"]),
    include_package_data=True,
    package_data={"dmore_nova.console": ["web/*.html"], "dmore_nova.demo": ["web/*"]},
    install_requires=[
        "oslo.config>=9",
        "oslo.log>=5",
        "oslo.messaging>=14",
        "websockify>=0.11",
        "pyxs>=0.4.1",
        "numpy>=1.24",
        "Pillow>=10",
    ],
    extras_require={
        "jpeg": ["Pillow>=10"],
        "test": ["pytest", "hypothesis", "vncdotool>=1.2", "Pillow>=10", "pyte", "ruff"],
    },
    entry_points={
        "console_scripts": [
            "dmore-nova = dmore_nova.cmd.dmore_nova:main",
            "dmore-rfb-demo = dmore_nova.rm_vm.rfb.__main__:main",
            "dmore-rm-agent = dmore_nova.cmd.rm_agent:main",
            "dmore-sim = dmore_nova.xen.sim.supervisor:main",
            "dmore-console-proxy = dmore_nova.console.__main__:main",
            "dmore-xl-rmvm = dmore_nova.cmd.xl_rmvm:main",
        ],
        "oslo.config.opts": [
            "dmore_nova = dmore_nova.conf:list_opts",
        ],
    },
)
