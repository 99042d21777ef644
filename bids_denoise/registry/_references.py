"""The publications the methods cite, each declared once (a method's ``MethodSpec.references`` lists those
its citation sentence cites as ``[key]``)."""

from __future__ import annotations

from bids_denoise.contract import Reference

STEIN1981 = Reference(
    "stein1981",
    "Stein CM. Estimation of the mean of a multivariate normal distribution. The Annals of Statistics "
    "9(6):1135-1151, 1981.",
    "@article{stein1981,\n  author={Stein, Charles M.},\n  title={Estimation of the mean of a multivariate normal "
    "distribution},\n  journal={The Annals of Statistics},\n  volume={9},\n  number={6},\n  pages={1135--1151},\n"
    "  year={1981}\n}",
)


VERAART2016 = Reference(
    "veraart2016",
    "Veraart J, Novikov DS, Christiaens D, Ades-aron B, Sijbers J, Fieremans E. Denoising of diffusion MRI using "
    "random matrix theory. NeuroImage 142:394-406, 2016.",
    "@article{veraart2016,\n  author={Veraart, Jelle and Novikov, Dmitry S. and Christiaens, Daan and Ades-aron, "
    "Benjamin and Sijbers, Jan and Fieremans, Els},\n  title={Denoising of diffusion MRI using random matrix "
    "theory},\n  journal={NeuroImage},\n  volume={142},\n  pages={394--406},\n  year={2016}\n}",
)


CORDEROGRANDE2019 = Reference(
    "corderogrande2019",
    "Cordero-Grande L, Christiaens D, Hutter J, Price AN, Hajnal JV. Complex diffusion-weighted image estimation "
    "via matrix recovery under general noise models. NeuroImage 200:391-404, 2019.",
    "@article{corderogrande2019,\n  author={Cordero-Grande, Lucilio and Christiaens, Daan and Hutter, Jana and "
    "Price, Anthony N. and Hajnal, Jo V.},\n  title={Complex diffusion-weighted image estimation via matrix "
    "recovery under general noise models},\n  journal={NeuroImage},\n  volume={200},\n  pages={391--404},\n"
    "  year={2019}\n}",
)


GAVISH2017 = Reference(
    "gavish2017",
    "Gavish M, Donoho DL. Optimal shrinkage of singular values. IEEE Transactions on Information Theory "
    "63(4):2137-2152, 2017.",
    "@article{gavish2017,\n  author={Gavish, Matan and Donoho, David L.},\n  title={Optimal shrinkage of singular "
    "values},\n  journal={IEEE Transactions on Information Theory},\n  volume={63},\n  number={4},\n"
    "  pages={2137--2152},\n  year={2017}\n}",
)


KOAY2006 = Reference(
    "koay2006",
    "Koay CG, Basser PJ. Analytically exact correction scheme for signal extraction from noisy magnitude MR "
    "signals. Journal of Magnetic Resonance 179(2):317-322, 2006.",
    "@article{koay2006,\n  author={Koay, Cheng Guan and Basser, Peter J.},\n  title={Analytically exact correction "
    "scheme for signal extraction from noisy magnitude MR signals},\n  journal={Journal of Magnetic Resonance},\n"
    "  volume={179},\n  number={2},\n  pages={317--322},\n  year={2006}\n}",
)


MANJON2013 = Reference(
    "manjon2013",
    "Manjon JV, Coupe P, Concha L, Buades A, Collins DL, Robles M. Diffusion weighted image denoising using "
    "overcomplete local PCA. PLoS One 8(9):e73021, 2013.",
    "@article{manjon2013,\n  author={Manj{\\'o}n, Jos{\\'e} V. and Coup{\\'e}, Pierrick and Concha, Luis and Buades, "
    "Antonio and Collins, D. Louis and Robles, Montserrat},\n  title={Diffusion weighted image denoising using "
    "overcomplete local PCA},\n  journal={PLoS One},\n  volume={8},\n  number={9},\n  pages={e73021},\n"
    "  year={2013}\n}",
)


MANJON2015 = Reference(
    "manjon2015",
    "Manjon JV, Coupe P, Buades A. MRI noise estimation and denoising using non-local PCA. Medical Image Analysis "
    "22(1):35-47, 2015.",
    "@article{manjon2015,\n  author={Manj{\\'o}n, Jos{\\'e} V. and Coup{\\'e}, Pierrick and Buades, Antonio},\n"
    "  title={MRI noise estimation and denoising using non-local PCA},\n  journal={Medical Image Analysis},\n"
    "  volume={22},\n  number={1},\n  pages={35--47},\n  year={2015}\n}",
)


EICHNER2015 = Reference(
    "eichner2015",
    "Eichner C, Cauley SF, Cohen-Adad J, Moller HE, Turner R, Setsompop K, Wald LL. Real diffusion-weighted MRI "
    "enabling true signal averaging and increasing diffusion contrast. NeuroImage 122:373-384, 2015.",
    "@article{eichner2015,\n  author={Eichner, Cornelius and Cauley, Stephen F. and Cohen-Adad, Julien and "
    "M{\\\"o}ller, Harald E. and Turner, Robert and Setsompop, Kawin and Wald, Lawrence L.},\n  title={Real "
    "diffusion-weighted MRI enabling true signal averaging and increasing diffusion contrast},\n"
    "  journal={NeuroImage},\n  volume={122},\n  pages={373--384},\n  year={2015}\n}",
)


LEHTINEN2018 = Reference(
    "lehtinen2018",
    "Lehtinen J, Munkberg J, Hasselgren J, Laine S, Karras T, Aittala M, Aila T. Noise2Noise: Learning Image "
    "Restoration without Clean Data. ICML 2018.",
    "@inproceedings{lehtinen2018,\n  author={Lehtinen, Jaakko and others},\n  title={Noise2Noise: Learning Image "
    "Restoration without Clean Data},\n  booktitle={ICML},\n  year={2018}\n}",
)


BATSON2019 = Reference(
    "batson2019",
    "Batson J, Royer L. Noise2Self: Blind Denoising by Self-Supervision. ICML 2019.",
    "@inproceedings{batson2019,\n  author={Batson, Joshua and Royer, Loic},\n  title={Noise2Self: Blind Denoising "
    "by Self-Supervision},\n  booktitle={ICML},\n  year={2019}\n}",
)


MOELLER2021 = Reference(
    "moeller2021",
    "Moeller S, Pisharady PK, Ramanna S, Lenglet C, Wu X, Dowdle L, Yacoub E, Ugurbil K, Akcakaya M. NOise "
    "reduction with DIstribution Corrected (NORDIC) PCA in dMRI with complex-valued parameter-free locally "
    "low-rank processing. NeuroImage 226:117539, 2021.",
    "@article{moeller2021,\n  author={Moeller, Steen and Pisharady, Pramod Kumar and Ramanna, Sudhir and Lenglet, "
    "Christophe and Wu, Xiaoping and Dowdle, Logan and Yacoub, Essa and Ugurbil, Kamil and Akcakaya, Mehmet},\n"
    "  title={NOise reduction with DIstribution Corrected (NORDIC) PCA in dMRI with complex-valued parameter-free "
    "locally low-rank processing},\n  journal={NeuroImage},\n  volume={226},\n  pages={117539},\n  year={2021}\n}",
)


VIZIOLI2021 = Reference(
    "vizioli2021",
    "Vizioli L, Moeller S, Dowdle L, et al. Lowering the thermal noise barrier in functional brain mapping with "
    "magnetic resonance imaging. Nature Communications 12:5181, 2021.",
    "@article{vizioli2021,\n  author={Vizioli, Luca and Moeller, Steen and Dowdle, Logan and others},\n"
    "  title={Lowering the thermal noise barrier in functional brain mapping with magnetic resonance imaging},\n"
    "  journal={Nature Communications},\n  volume={12},\n  pages={5181},\n  year={2021}\n}",
)


XIANG2023 = Reference(
    "xiang2023",
    "Xiang T, Yurt M, Syed AB, Setsompop K, Chaudhari A. DDM2: Self-Supervised Diffusion MRI Denoising with "
    "Generative Diffusion Models. ICLR 2023.",
    "@inproceedings{xiang2023,\n  author={Xiang, Tiange and Yurt, Mahmut and Syed, Ali B. and Setsompop, Kawin and "
    "Chaudhari, Akshay},\n  title={{DDM2}: Self-Supervised Diffusion {MRI} Denoising with Generative Diffusion "
    "Models},\n  booktitle={ICLR},\n  year={2023}\n}",
)


FADNAVIS2020 = Reference(
    "fadnavis2020",
    "Fadnavis S, Batson J, Garyfallidis E. Patch2Self: Denoising Diffusion MRI with Self-Supervised Learning. "
    "Advances in Neural Information Processing Systems 33, 2020.",
    "@inproceedings{fadnavis2020,\n  author={Fadnavis, Shreyas and Batson, Joshua and Garyfallidis, Eleftherios},\n"
    "  title={Patch2Self: Denoising Diffusion MRI with Self-Supervised Learning},\n"
    "  booktitle={Advances in Neural Information Processing Systems},\n  volume={33},\n  year={2020}\n}",
)


ZHAO2021 = Reference(
    "zhao2021",
    "Zhao C, Dewey BE, Pham DL, Calabresi PA, Reich DS, Prince JL. SMORE: A Self-Supervised Anti-Aliasing and "
    "Super-Resolution Algorithm for MRI Using Deep Learning. IEEE Transactions on Medical Imaging 40:805-817, 2021.",
    "@article{zhao2021,\n  author={Zhao, Can and Dewey, Blake E. and Pham, Dzung L. and Calabresi, Peter A. and "
    "Reich, Daniel S. and Prince, Jerry L.},\n  title={SMORE: A Self-Supervised Anti-Aliasing and "
    "Super-Resolution Algorithm for MRI Using Deep Learning},\n  journal={IEEE Transactions on Medical Imaging},\n"
    "  volume={40},\n  pages={805--817},\n  year={2021}\n}",
)
